"""CPU inference latency of detection networks: the engine (BN folded, as `engine detect` runs
it) against OpenCV's DNN module and PyTorch, batch 1, 416x416, on one shared random weights file.

    python benchmarks/cpu_detection_benchmark.py [--networks yolov3-tiny yolov4-tiny yolov3]
        [--runs 10] [--warmup 3] [--threads 2] [--profile] [--layers] [--interleave]

Every peer runs in its own process (a fresh interpreter, its thread count fixed through the
environment before numpy/OpenCV/PyTorch start) on the same cfg (rewritten to 416x416, batch 1),
the same .weights (written by the engine from its random initialisation, BN statistics
randomised so that folding is exercised) and the same input. Each prints the median of `runs`
forwards after `warmup` (with --interleave the peers' processes run side by side, idle in turn:
one forward each, the order reversed every round, so that a machine whose speed drifts from
minute to minute is shared evenly). The outputs of the convolutions that feed the [yolo]
layers are compared (engine against OpenCV and PyTorch: largest difference relative to the
largest value) so the comparison is between equal computations. `--profile` adds the engine's
per-layer table (layer by layer, no inference plans); `--layers` the engine's per-layer times in
predict (its plans) beside OpenCV's own (getPerfProfile), each measured in its peer's process.

Peers are benchmark-only (never engine dependencies): `pip install 'opencv-python-headless<5'
torch` (OpenCV 5 dropped the Darknet importer). A peer that is not installed is reported as such.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CFGS = {"yolov3-tiny": os.path.join(ROOT, "cfg", "yolov3-tiny.cfg"),
        "yolov4-tiny": os.path.join(ROOT, "cfg", "yolov4-tiny.cfg"),
        "yolov3": os.path.join(ROOT, "cfg", "yolov3.cfg")}
SIZE = 416
PEERS = ("engine", "opencv", "torch")


# ---- set-up (the parent process) --------------------------------------------------------------
def inference_cfg(src, dst, size=SIZE):
    """A copy of the cfg whose [net] says batch=1, subdivisions=1, width=height=size."""
    rewrite_cfg(src, dst, {"net": {"batch": 1, "subdivisions": 1, "width": size, "height": size}})


def rewrite_cfg(src, dst, settings):
    """A copy of the cfg in which each section named in `settings` ("net", "yolo", ...) has
    the given key -> value pairs instead of its own."""
    out, current = [], None
    with open(src) as handle:
        lines = handle.readlines()
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("["):
            name = stripped.strip("[]").strip().lower()
            current = settings.get("net" if name == "network" else name)
            out.append(line)
            if current:
                out += [f"{key}={value}\n" for key, value in current.items()]
            continue
        if current and stripped.split("=", 1)[0].strip() in current:
            continue
        out.append(line)
    with open(dst, "w") as handle:
        handle.writelines(out)


def write_random_weights(cfg, path, seed=1):
    """The engine's random initialisation, with BN statistics and biases drawn too (so folding
    them matters), saved as a Darknet .weights file every peer reads."""
    import engine
    net = engine.load(cfg, seed=seed, quiet=True)
    rng = np.random.default_rng(seed)
    for layer in net.layers:
        p = layer.params
        if "rolling_mean" in p:
            n = p["biases"].shape
            p["scales"][...] = rng.uniform(0.5, 1.5, n)
            p["biases"][...] = rng.uniform(-0.1, 0.1, n)
            p["rolling_mean"][...] = rng.uniform(-0.1, 0.1, n)
            p["rolling_variance"][...] = rng.uniform(0.5, 1.5, n)
    net.save_weights(path)


def yolo_inputs(cfg):
    """Indexes of the layers feeding each [yolo] layer (the convolutions compared)."""
    import engine
    net = engine.load(cfg, quiet=True)
    return [layer.index - 1 for layer in net.layers if layer.type_name == "yolo"]


# ---- peers (each in its own process) ----------------------------------------------------------
def median_ms(step, runs, warmup):
    for _ in range(warmup):
        step()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times)), 1e3 * float(np.min(times))


# Each peer: prepare(cfg, weights, x, compare, threads) -> (step, outputs, version): one forward,
# the compared layers' outputs (after one more forward), the version string.
def prepare_engine(cfg, weights, x, compare, threads):
    import engine
    net = engine.load(cfg, weights, quiet=True).fold_batchnorm()

    def outputs():
        net.predict(x)
        return [np.asarray(net.outputs[i]).reshape(-1) for i in compare]
    return lambda: net.predict(x), outputs, f"numpy {np.__version__}"


def prepare_opencv(cfg, weights, x, compare, threads):
    import cv2
    cv2.setNumThreads(threads)
    net = cv2.dnn.readNetFromDarknet(cfg, weights)
    net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    net.setPreferableTarget(cv2.dnn.DNN_TARGET_CPU)
    names = net.getUnconnectedOutLayersNames()

    def step():
        net.setInput(x)
        return net.forward(names)

    def outputs():
        net.setInput(x)
        return [np.asarray(o).reshape(-1) for o in net.forward([f"conv_{i}" for i in compare])]
    return step, outputs, f"OpenCV {cv2.__version__}"


def prepare_torch(cfg, weights, x, compare, threads):
    import torch
    from torch_peers import torch_from_network

    import engine
    torch.set_num_threads(threads)
    net = engine.load(cfg, weights, quiet=True).fold_batchnorm()
    model = torch_from_network(net, torch).eval()
    xt = torch.from_numpy(x)

    def step():
        with torch.inference_mode():
            return model(xt)

    def outputs():
        step()
        return [model.outputs[i].numpy().reshape(-1) for i in compare]
    return step, outputs, f"PyTorch {torch.__version__}"


def peer_main(args):
    """One peer in its own process: `runs` forwards after `warmup` (the median and minimum), or
    with --serve, one forward per "run" line read from stdin (its milliseconds written back)
    until "stop" (--interleave: the parent alternates the peers forward by forward)."""
    x = np.load(args.input)
    compare = [int(i) for i in args.compare.split(",")]
    prepare = {"engine": prepare_engine, "opencv": prepare_opencv,
               "torch": prepare_torch}[args.peer]
    try:
        step, outputs, version = prepare(args.cfg, args.weights, x, compare, args.threads)
    except ImportError as error:
        figures = {"missing": str(error)}
    else:
        if args.serve:
            for _ in range(args.warmup):
                step()
            print("ready", flush=True)
            times = []
            for line in sys.stdin:
                if line.strip() != "run":
                    break
                start = time.perf_counter()
                step()
                times.append(time.perf_counter() - start)
                print(f"{1e3 * times[-1]:.4f}", flush=True)
            med, best = 1e3 * float(np.median(times)), 1e3 * float(np.min(times))
        else:
            med, best = median_ms(step, args.runs, args.warmup)
        np.savez(args.result + ".npz", *outputs())
        figures = {"median_ms": med, "min_ms": best, "version": version}
        if args.layers and args.peer == "engine":
            figures["layers"], figures["notes"] = engine_layer_times(args.cfg, args.weights, x,
                                                                     args.runs)
        elif args.layers and args.peer == "opencv":
            figures["layers"] = opencv_layer_times(args.cfg, args.weights, x, args.runs,
                                                   args.threads)
    with open(args.result, "w") as handle:
        json.dump(figures, handle)


# How the engine uses its threads: "own" = the backend's threads over single-threaded BLAS
# calls, "blas" = one Python thread and a multi-threaded BLAS, "single" = one thread in all.
ENGINE_MODES = {"own": lambda n: (1, n), "blas": lambda n: (n, 1), "single": lambda n: (1, 1)}
MODE_NAMES = {"own": "engine threads", "blas": "BLAS threads", "single": "1 thread"}


def peer_command(peer, cfg, weights, input_path, compare, args, folder, mode=None, serve=False):
    """(command, environment, result path) of one peer's process."""
    result = os.path.join(folder, f"{peer}-{mode}.json" if mode else f"{peer}.json")
    env = dict(os.environ)
    blas, own = ENGINE_MODES[mode](args.threads) if mode else (args.threads, 1)
    for key in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[key] = str(blas)
    env["ENGINE_CPU_THREADS"] = str(own)
    command = [sys.executable, os.path.abspath(__file__), "--peer", peer, "--cfg", cfg,
               "--weights", weights, "--input", input_path, "--result", result,
               "--compare", ",".join(map(str, compare)), "--runs", str(args.runs),
               "--warmup", str(args.warmup), "--threads", str(args.threads)]
    command += ["--layers"] if args.layers else []
    return command + (["--serve"] if serve else []), env, result


def read_result(result, compare):
    with open(result) as handle:
        figures = json.load(handle)
    if "missing" not in figures:
        with np.load(result + ".npz") as data:
            figures["outputs"] = [data[f"arr_{i}"] for i in range(len(compare))]
    return figures


def spawn(peer, cfg, weights, input_path, compare, args, folder, mode=None):
    command, env, result = peer_command(peer, cfg, weights, input_path, compare, args, folder,
                                        mode)
    subprocess.run(command, env=env, check=True, cwd=os.path.dirname(os.path.abspath(__file__)))
    return read_result(result, compare)


INTERLEAVE_PAUSE = 0.01  # seconds between two peers' forwards (their spin-waits end)


def spawn_interleaved(runs, cfg, weights, input_path, compare, args, folder):
    """Every (key, peer, mode) of `runs` in its own process at once, idle between forwards;
    the parent asks each for one forward in turn (the order reversed every round), so that
    all peers see the same minutes of a machine whose speed drifts. {key: figures}."""
    here = os.path.dirname(os.path.abspath(__file__))
    procs = {}
    for key, peer, mode in runs:
        command, env, result = peer_command(peer, cfg, weights, input_path, compare, args,
                                            folder, mode, serve=True)
        proc = subprocess.Popen(command, env=env, cwd=here, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
        procs[key] = (proc, result, proc.stdout.readline().strip() == "ready")
        if not procs[key][2]:  # not installed: the process has written its result and ended
            proc.wait()
    live = [key for key, (_, _, ready) in procs.items() if ready]
    for r in range(args.runs):
        for key in (live if r % 2 == 0 else live[::-1]):
            time.sleep(INTERLEAVE_PAUSE)  # the previous peer's threads idle (spin-waits end)
            proc = procs[key][0]
            proc.stdin.write("run\n")
            proc.stdin.flush()
            proc.stdout.readline()
    figures = {}
    for key, (proc, result, ready) in procs.items():
        if ready:
            proc.stdin.write("stop\n")
            proc.stdin.close()
        if proc.wait() != 0:
            raise SystemExit(f"peer {key} failed")
        figures[key] = read_result(result, compare)
    return figures


def relative_difference(a, b):
    return max(float(np.abs(x - y).max() / max(np.abs(y).max(), 1e-12)) for x, y in zip(a, b))


# ---- per-layer profile of the engine's forward --------------------------------------------------
def profile(cfg, weights, x, runs):
    """Per-layer milliseconds (median over runs) of the folded engine forward, with the share
    of each layer type (convolutions by kind: 3x3, strided, 1x1) and the time spent inside
    im2col copies, input padding and the bias + activation pass (median per forward)."""
    import engine
    net = engine.load(cfg, weights, quiet=True).fold_batchnorm()
    ops, xa = net.ops, net.ops.asarray(x)
    net.forward(xa)
    # time spent inside some backend operations (instance attributes shadow the methods)
    inside = {"im2col copies": ["_im2col"], "input padding": ["_padded_input"],
              # separate passes only: inference convolutions with a bias do theirs inside
              # (conv_bias_forward), so it is counted in their layer's time
              "bias + activation (separate passes)": ["add_bias_", "activate_"]}
    spent = {part: 0.0 for part in inside}
    depth = [0]  # only the outermost of nested calls (add_bias_ calling activate_) counts

    def timed(method, part):
        def call(*a, **k):
            start = time.perf_counter()
            depth[0] += 1
            try:
                return method(*a, **k)
            finally:
                depth[0] -= 1
                if not depth[0]:
                    spent[part] += time.perf_counter() - start
        return call
    for part, methods in inside.items():
        for name in methods:
            if hasattr(ops, name):
                setattr(ops, name, timed(getattr(ops, name), part))
    per_layer = np.zeros((runs, len(net.layers)))
    per_part = {part: [] for part in inside}
    for r in range(runs):
        for part in spent:
            spent[part] = 0.0
        outputs = []
        for layer in net.layers:
            inputs = [xa if j < 0 else outputs[j] for j in layer.input_indices]
            start = time.perf_counter()
            outputs.append(layer.forward(ops, inputs if layer.multi_input else inputs[0], False))
            per_layer[r, layer.index] = time.perf_counter() - start
        for part, t in spent.items():
            per_part[part].append(t)
    ms = 1e3 * np.median(per_layer, axis=0)
    total = ms.sum()
    groups = {}
    rows = []
    for layer, t in zip(net.layers, ms):
        kind = layer.type_name
        if kind == "convolutional":
            kind = f"conv {layer.size}x{layer.size}"
            kind += f"/{layer.stride}" if layer.stride > 1 else ""
        groups[kind] = groups.get(kind, 0.0) + t
        flops = layer.flops() if hasattr(layer, "flops") else 0
        rows.append((layer.index, kind, "x".join(map(str, layer.out_shape)), t,
                     flops / (t * 1e6) if t > 0 and flops else 0.0))
    print(f"\nper-layer profile of {os.path.basename(cfg)} (median of {runs}, total "
          f"{total:.1f} ms)\n\n| layer | type | output | ms | GFLOP/s |\n|---|---|---|---|---|")
    for index, kind, shape, t, gflops in rows:
        print(f"| {index} | {kind} | {shape} | {t:.2f} | {gflops:.0f} |")
    print("\n| layer type | ms | share |\n|---|---|---|")
    for kind, t in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"| {kind} | {t:.1f} | {100 * t / total:.0f}% |")
    print("\n| inside the layers (median per forward) | ms | share |\n|---|---|---|")
    for part, times in per_part.items():
        t = 1e3 * float(np.median(times))
        print(f"| {part} | {t:.1f} | {100 * t / total:.0f}% |")


# ---- per-layer times against OpenCV (--layers) -----------------------------------------------
def engine_layer_times(cfg, weights, x, runs, warmup=3):
    """({layer index: ms}, {layer index: note}): the median time of each layer's own call in
    net.predict (the folded network, the inference plans as the benchmark runs them), per
    forward. A chain of pooled convolutions (conv_bias_maxpool_chain) is timed as one call,
    put on its first layer (note: the layers it covers); a convolution that computes a
    [maxpool]'s output (the pooling plan) includes that maxpool's time (note: which), the
    maxpool's own row then holds only its bookkeeping."""
    import engine
    net = engine.load(cfg, weights, quiet=True).fold_batchnorm()
    spent = {}  # layer index -> seconds in this forward

    def timed(method, index):
        def call(*a, **k):
            start = time.perf_counter()
            try:
                return method(*a, **k)
            finally:
                spent[index] = spent.get(index, 0.0) + time.perf_counter() - start
        return call
    for layer in net.layers:
        for name in ("forward", "forward_pooled", "forward_into", "forward_placed",
                     "forward_given"):
            if hasattr(layer, name):  # (an instance attribute shadows the method)
                setattr(layer, name, timed(getattr(layer, name), layer.index))
    net.predict(x)  # the plans are made at the first forward
    chains = net._chains()
    notes = {index: f"chain of layers {index}-{chain[-1][1].index}"
             for index, chain in chains.items()}
    notes.update({index: f"pools for layer {pool.index}"
                  for index, (pool, _, _) in net._pooling_plan().items()
                  if not any(index in (c.index for c, _ in chain) for chain in chains.values())})
    # a forward runs its chains in layer order: the k-th chain call is the k-th chain's
    order, calls = sorted(chains), [0]
    chain_ = net.ops.conv_bias_maxpool_chain

    def chain(*a, **k):
        start = time.perf_counter()
        try:
            return chain_(*a, **k)
        finally:
            index = order[calls[0] % len(order)]
            calls[0] += 1
            spent[index] = spent.get(index, 0.0) + time.perf_counter() - start
    net.ops.conv_bias_maxpool_chain = chain
    for _ in range(warmup):
        net.predict(x)
    per_forward = []
    for _ in range(runs):
        spent.clear()
        calls[0] = 0
        net.predict(x)
        per_forward.append([spent.get(layer.index, 0.0) for layer in net.layers])
    ms = 1e3 * np.median(np.array(per_forward), axis=0)
    return {layer.index: float(t) for layer, t in zip(net.layers, ms)}, notes


def opencv_layer_index(name):
    """The Darknet layer index an OpenCV layer name ends with (conv_12, permute_16, yolo_16),
    or None."""
    tail = name.rsplit("_", 1)[-1]
    return int(tail) if tail.isdigit() else None


def opencv_layer_times(cfg, weights, x, runs, threads, warmup=3):
    """{layer index: ms}: OpenCV's own per-layer times (cv2.dnn.Net.getPerfProfile after each
    forward, medians), summed per Darknet layer (permute_16 and yolo_16 are layer 16's).
    OpenCV fuses batch norm and the activation into the convolution: those have no row."""
    import cv2
    cv2.setNumThreads(threads)
    net = cv2.dnn.readNetFromDarknet(cfg, weights)
    net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    net.setPreferableTarget(cv2.dnn.DNN_TARGET_CPU)
    names = list(net.getLayerNames())
    outputs = net.getUnconnectedOutLayersNames()
    per_forward = []
    for r in range(warmup + runs):
        net.setInput(x)
        net.forward(outputs)
        _, layer_ticks = net.getPerfProfile()
        if r >= warmup:
            per_forward.append(np.asarray(layer_ticks, np.float64).reshape(-1))
    ms = 1e3 * np.median(np.array(per_forward), axis=0) / cv2.getTickFrequency()
    times = {}
    for name, t in zip(names, ms):
        index = opencv_layer_index(name)
        if index is not None:
            times[index] = times.get(index, 0.0) + float(t)
    return times


def layer_table(types, engine_ms, opencv_ms, notes):
    """The markdown rows of the per-layer comparison (layer, type, engine ms, OpenCV ms,
    engine - OpenCV), with a sum row."""
    rows = ["| layer | type | engine ms | OpenCV ms | engine - OpenCV | note |",
            "|---|---|---|---|---|---|"]
    for index, kind in enumerate(types):
        e, o = engine_ms.get(index, 0.0), opencv_ms.get(index, 0.0)
        rows.append(f"| {index} | {kind} | {e:.2f} | {o:.2f} | {e - o:+.2f} | "
                    f"{notes.get(index, '')} |")
    e, o = sum(engine_ms.values()), sum(opencv_ms.values())
    rows.append(f"| sum | | {e:.2f} | {o:.2f} | {e - o:+.2f} | |")
    return rows


def layer_types(cfg):
    """Each layer's kind as the tables name it (conv 3x3, conv 3x3/2, maxpool, route...)."""
    import engine
    kinds = []
    for layer in engine.load(cfg, quiet=True).layers:
        kind = layer.type_name
        if kind == "convolutional":
            kind = f"conv {layer.size}x{layer.size}" + (f"/{layer.stride}" if layer.stride > 1
                                                        else "")
            kind += f" {layer.in_shape[0]}->{layer.out_shape[0]} at {layer.out_shape[1]}"
        kinds.append(kind)
    return kinds


# ---- the run --------------------------------------------------------------------------------
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--networks", nargs="+", default=list(CFGS), choices=list(CFGS))
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--peers", nargs="+", default=list(PEERS), choices=PEERS)
    p.add_argument("--engine-modes", nargs="+", default=["own", "blas"], choices=ENGINE_MODES,
                   help="engine runs: own = ENGINE_CPU_THREADS=threads with single-threaded "
                        "BLAS; blas = OPENBLAS_NUM_THREADS=threads; single = 1 thread "
                        "(default: own blas)")
    p.add_argument("--profile", action="store_true", help="print the engine's per-layer table")
    p.add_argument("--layers", action="store_true",
                   help="per layer, the engine (predict's plans, its first mode) against "
                        "OpenCV's own per-layer times (getPerfProfile), each in its process")
    p.add_argument("--interleave", action="store_true",
                   help="run the peers' processes side by side, one forward each in turn (the "
                        "order reversed every round), instead of one process after the other")
    for name in ("--peer", "--cfg", "--weights", "--input", "--result", "--compare"):
        p.add_argument(name, help=argparse.SUPPRESS)
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.peer:
        return peer_main(args)
    load = os.getloadavg()
    interleaved = " (peers interleaved forward by forward)" if args.interleave else ""
    print(f"batch 1, {SIZE}x{SIZE}, {args.threads} threads per peer, median of {args.runs} after "
          f"{args.warmup} warm-up{interleaved}; load average {load[0]:.2f} {load[1]:.2f} "
          f"{load[2]:.2f}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        x = np.random.default_rng(0).random((1, 3, SIZE, SIZE), dtype=np.float32)
        input_path = os.path.join(folder, "input.npy")
        np.save(input_path, x)
        for name in args.networks:
            cfg = os.path.join(folder, f"{name}.cfg")
            inference_cfg(CFGS[name], cfg)
            weights = os.path.join(folder, f"{name}.weights")
            write_random_weights(cfg, weights)
            compare = yolo_inputs(cfg)
            runs = [(f"engine-{mode}", peer, mode) if peer == "engine" else (peer, peer, None)
                    for peer in args.peers
                    for mode in (args.engine_modes if peer == "engine" else [None])]
            if args.interleave:
                figures = spawn_interleaved(runs, cfg, weights, input_path, compare, args,
                                            folder)
            else:
                figures = {key: spawn(peer, cfg, weights, input_path, compare, args, folder,
                                      mode) for key, peer, mode in runs}
            rows.append((name, figures))
            if args.layers:
                engine_figures = figures.get(f"engine-{args.engine_modes[0]}", {})
                opencv_figures = figures.get("opencv", {})
                if "layers" in engine_figures and "layers" in opencv_figures:
                    as_ints = lambda d: {int(k): v for k, v in d.items()}  # (JSON's keys)
                    print(f"\nper layer, {name} (medians of {args.runs}; engine "
                          f"{MODE_NAMES[args.engine_modes[0]]}):\n")
                    print("\n".join(layer_table(layer_types(cfg),
                                                as_ints(engine_figures["layers"]),
                                                as_ints(opencv_figures["layers"]),
                                                as_ints(engine_figures["notes"]))))
            if args.profile:
                profile(cfg, weights, x, args.runs)
    engines = [f"engine-{m}" for m in args.engine_modes] if "engine" in args.peers else []
    peers = [p for p in ("opencv", "torch") if p in args.peers]
    names = {"opencv": "OpenCV", "torch": "PyTorch"}
    names.update({f"engine-{m}": f"engine ({MODE_NAMES[m]})" for m in ENGINE_MODES})
    header = [f"{names[p]} ms" for p in engines + peers]
    header += [f"{names[e]} / {names[p]}" for e in engines for p in peers]
    header += [f"max rel. diff engine vs {names[p]}" for p in peers if engines]
    print("\n| network | " + " | ".join(header) + " |")
    print("|---" * (len(header) + 1) + "|")
    versions = set()
    for name, figures in rows:
        cells = []
        for key in engines + peers:
            f = figures[key]
            if "missing" in f:
                cells.append("not installed")
                continue
            versions.add(f["version"])
            cells.append(f"{f['median_ms']:.1f}")
        usable = {k: f for k, f in figures.items() if "missing" not in f}
        for e in engines:
            for p in peers:
                ok = e in usable and p in usable
                cells.append(f"{usable[e]['median_ms'] / usable[p]['median_ms']:.2f}"
                             if ok else "-")
        for p in peers if engines else ():
            e = engines[0]
            ok = e in usable and p in usable
            cells.append(f"{relative_difference(usable[e]['outputs'], usable[p]['outputs']):.1e}"
                         if ok else "-")
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("\n" + ", ".join(sorted(versions)) + f"; load average after: "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
