"""The `engine` command: parse arguments, call the API, turn user errors into one line.

    engine train   cfg/mnist.cfg [--data D] [--weights W] [--max-batches N] [--seed S] [--cpu|--gpu N]
    engine test    cfg/mnist.cfg weights/mnist.weights [--data D] [--cpu|--gpu N]
    engine predict cfg/mnist.cfg weights/mnist.weights digit.png [--data D] [--top K]
"""

import argparse
import os
import sys
import time

import numpy as np

from . import data as data_io
from .backends import get_backend
from .errors import BackendError, EngineError
from .network import Network
from .train import evaluate, train


def add_backend_options(parser):
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--cpu", action="store_true", help="run on the CPU (numpy)")
    group.add_argument("--gpu", type=int, metavar="N", help="run on GPU N; an error if it is unusable")


def choose_backend(args, seed=0):
    """--cpu, --gpu N, or (neither) GPU 0 when usable, else the CPU with a note saying why."""
    if args.cpu:
        return get_backend("cpu", seed=seed)
    if args.gpu is not None:
        return get_backend("gpu", device=args.gpu, seed=seed)
    try:
        return get_backend("gpu", device=0, seed=seed)
    except BackendError as error:
        print(f"No usable GPU ({error}); using the CPU.", file=sys.stderr)
        return get_backend("cpu", seed=seed)


def build(args, seed=0, weights=None):
    net = Network(args.cfg, backend=choose_backend(args, seed), seed=seed)
    if weights:
        covered = net.load_weights(weights)
        with_params = [layer.index for layer in net.layers if layer.weight_order]
        if with_params and covered <= with_params[-1]:
            print(f"{weights}: loaded the layers before layer {covered}; the rest keep their "
                  "initial values", file=sys.stderr)
    return net


def data_config(args):
    return data_io.DataConfig(args.data or data_io.default_data_path(args.cfg))


def cmd_train(args):
    data = data_config(args)
    net = build(args, seed=args.seed, weights=args.weights)
    dataset = data.dataset("train", net.input_shape)
    backup = args.backup or data_io.resolve_path(data.backup, data.path)
    started = time.time()
    final = train(net, dataset, backup, max_batches=args.max_batches, seed=args.seed,
                  backup_every=args.backup_every)
    print(f"Trained {net.seen} images in {time.time() - started:.1f} s; weights: {final}")


def cmd_test(args):
    data = data_config(args)
    net = build(args, weights=args.weights)
    dataset = data.dataset("valid", net.input_shape)
    top = max(2, data.top)
    top1, topk = evaluate(net, dataset, top=top)
    print(f"top-1 {100 * top1:.2f}%  top-{top} {100 * topk:.2f}%  ({len(dataset)} images)")


def cmd_predict(args):
    net = build(args, weights=args.weights)
    data_path = args.data or data_io.default_data_path(args.cfg)
    labels = data_io.DataConfig(data_path).labels if (args.data or os.path.exists(data_path)) else None
    for image_path in args.images:
        image = data_io.load_image(image_path, net.input_shape)
        probabilities = net.predict(image[None])[0]
        order = np.argsort(-probabilities, kind="stable")[:args.top]
        print(f"{image_path}:")
        for k in order:
            name = labels[k] if labels and k < len(labels) else str(k)
            print(f"  {100 * probabilities[k]:6.2f}%  {name}")


def make_parser():
    parser = argparse.ArgumentParser(prog="engine", description="A Darknet-style neural-network engine.")
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("train", help="train a network on the data its .data file names")
    p.add_argument("cfg")
    p.add_argument("weights", nargs="?", help="start from these weights (same as --weights)")
    p.add_argument("--weights", dest="weights_option", help="start from these weights")
    p.add_argument("--data", help="the .data file (default: the one beside the cfg)")
    p.add_argument("--max-batches", type=int, help="stop after this many iterations")
    p.add_argument("--seed", type=int, default=0, help="seed for initialisation, batches, dropout")
    p.add_argument("--backup", help="folder for weights (default: the .data file's backup)")
    p.add_argument("--backup-every", type=int, default=100, metavar="N",
                   help="save <backup>/<cfg>.backup every N iterations (default 100)")
    add_backend_options(p)
    p.set_defaults(run=cmd_train)

    p = commands.add_parser("test", help="top-1/top-k accuracy on the .data file's valid set")
    p.add_argument("cfg")
    p.add_argument("weights")
    p.add_argument("--data", help="the .data file (default: the one beside the cfg)")
    add_backend_options(p)
    p.set_defaults(run=cmd_test)

    p = commands.add_parser("predict", help="classify image files")
    p.add_argument("cfg")
    p.add_argument("weights")
    p.add_argument("images", nargs="+")
    p.add_argument("--data", help="the .data file whose labels name the classes")
    p.add_argument("--top", type=int, default=5)
    add_backend_options(p)
    p.set_defaults(run=cmd_predict)
    return parser


def main(argv=None):
    args = make_parser().parse_args(argv)
    if getattr(args, "weights_option", None):
        args.weights = args.weights_option
    try:
        args.run(args)
    except EngineError as error:
        print(f"engine {args.command}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except MemoryError:
        print(f"engine {args.command}: error: out of memory; lower batch or raise subdivisions "
              "in the cfg", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
