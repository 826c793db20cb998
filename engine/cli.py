"""The `engine` command: parse arguments, call the API, turn user errors into one line.

    engine train   cfg/mnist.cfg [--data D] [--weights W] [--max-batches N] [--seed S] [--cpu|--gpu N]
                   [--map [--map-every N]] [--chart]
                   (a cfg with [yolo] layers trains a detector: Darknet's `detector train`)
    engine test    cfg/mnist.cfg weights/mnist.weights [--data D] [--cpu|--gpu N]
    engine predict cfg/mnist.cfg weights/mnist.weights digit.png [--data D] [--top K]
    engine info    cfg/yolov3.cfg
    engine detect  cfg/yolov3-tiny.cfg yolov3-tiny.weights dog.jpg [--names cfg/coco.names]
                   [--thresh 0.5] [--nms 0.45] [--out predictions.png]
    engine partial cfg/darknet53.cfg darknet53.weights darknet53.conv.74 74
    engine fuse    cfg/x.cfg x.weights x-fused.cfg x-fused.weights
    engine export  cfg/yolov3-tiny.cfg yolov3-tiny.weights yolov3-tiny.onnx [--batch N|dynamic]
                   [--opset 17] [--fp16] [--decode] [--nms [IOU]] [--thresh 0.5]
    engine map     cfg/mnist-detect.cfg weights.weights [--data D] [--thresh 0.25] [--iou 0.5]
                   [--points 0|11|101]
    engine calc_anchors cfg/mnist-detect.data [--num 9] [--width 416] [--height 416] [--seed S]
    engine mnist-detection data/mnist-detect [--train N] [--valid M] [--size 96] [--seed S]
"""

import argparse
import os
import sys
import time

import numpy as np

from . import data as data_io
from . import detection, distributed, loss_scaling, models
from .backends import get_backend
from .errors import BackendError, ConfigError, DataError, EngineError
from .network import Network
from .precision import PRECISIONS, REDUCED
from .train import evaluate, train


MESSAGE_LIMIT = 1000  # characters of an error line; the messages name files and values, cut


def add_backend_options(parser, several=False):
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--cpu", action="store_true", help="run on the CPU (numpy)")
    group.add_argument("--gpu", type=count, metavar="N",
                       help="run on GPU N; an error if it is unusable")
    parser.add_argument("--precision", choices=PRECISIONS,
                        help="GPU precision: fp32 (default, exact), tf32 (TF32 tensor cores for "
                             "convolutions, about 1e-3 relative error, PyTorch's default), fp16 "
                             "or bf16 (half-precision activations on tensor cores, float32 "
                             "parameters)")
    parser.add_argument("--tf32", action="store_true", help="the same as --precision tf32")
    parser.add_argument("--darknet", choices=("pjreddie", "alexeyab"),
                        help="whose inference batch-norm rule to use (default: the cfg tells; "
                             "AlexeyAB's divides by sqrt(var + 1e-5), pjreddie's by sqrt(var) + 1e-6)")
    if several:
        group.add_argument("--gpus", type=gpu_list, metavar="0,1,...",
                           help="data-parallel training, one rank per GPU (started with mpiexec "
                                "when this command is not already one of several ranks)")


def count(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got '{text}'") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value}")
    return value


def positive_int(text):
    value = count(text)
    if value == 0:
        raise argparse.ArgumentTypeError("expected a number >= 1, got 0")
    return value


def unit_interval(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got '{text}'") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1, got {text}")
    return value


def gpu_list(text):
    try:
        gpus = [count(g) for g in text.split(",") if g.strip() != ""]
    except (ValueError, argparse.ArgumentTypeError):
        raise argparse.ArgumentTypeError(f"expected GPU numbers like 0,1,2,3, got '{text}'") from None
    if not gpus:
        raise argparse.ArgumentTypeError("expected at least one GPU number")
    return gpus


def choose_backend(args, seed=0, rank=0):
    """--cpu, --gpu N, --gpus (one per rank), or (none) GPU 0 when usable, else the CPU with a
    note saying why."""
    precision = args.precision or ("tf32" if args.tf32 else "fp32")
    if args.cpu:
        return get_backend("cpu", seed=seed, precision=precision)
    if getattr(args, "gpus", None):
        return get_backend("gpu", device=args.gpus[rank % len(args.gpus)], seed=seed,
                           precision=precision)
    if args.gpu is not None:
        return get_backend("gpu", device=args.gpu, seed=seed, precision=precision)
    try:
        return get_backend("gpu", device=0, seed=seed, precision=precision)
    except BackendError as error:
        if precision in REDUCED:
            raise BackendError(f"precision {precision} needs a GPU: {error}") from None
        print(f"No usable GPU ({error}); using the CPU.", file=sys.stderr)
        return get_backend("cpu", seed=seed)


def build(args, seed=0, weights=None, rank=0, inference=False):
    """The cfg's network on the chosen backend, with `weights` loaded; for inference its batch
    norms are folded into the weights (the same outputs, one pass less per layer)."""
    net = Network(args.cfg, backend=choose_backend(args, seed, rank), seed=seed, quiet=rank > 0,
                  darknet=getattr(args, "darknet", None))
    if weights:
        load_weights(net, weights)
    return net.fold_batchnorm() if inference else net


def load_weights(net, weights):
    """Load `weights`, with a note when the file covers only the first layers."""
    covered = net.load_weights(weights)
    if covered < net.layers_with_weights:
        print(f"{weights}: loaded the layers before layer {covered}; the rest keep their "
              "initial values", file=sys.stderr)


def data_config(args):
    if args.data:
        return data_io.DataConfig(args.data)
    if not os.path.isfile(args.cfg):
        # The default .data file is found beside the cfg: a missing cfg is the error to report.
        raise ConfigError(f"{args.cfg}: cfg file not found")
    path = data_io.default_data_path(args.cfg)
    if not os.path.exists(path):
        raise ConfigError(f"{path}: data file not found (looked for beside {args.cfg}; name "
                          "another with --data FILE)")
    return data_io.DataConfig(path)


def training_set(net, data, seed=0):
    """The cfg decides what kind of training this is: a network whose losses are [yolo] layers
    is a detector (Darknet's `detector train`: boxes from label files), one whose loss is
    [softmax] or [cost] a classifier. A detector's images are augmented as its cfg asks."""
    if net.training_task == "detector":
        from .augmentation import DetectionAugmentation

        dataset = data.detection_dataset("train", net.input_shape, net.truth_boxes)
        from .multiscale import MultiScale

        augmentation = DetectionAugmentation.from_network(net)
        if augmentation.changes_images:
            dataset.augment(augmentation, seed)
        dataset.multiscale = MultiScale.from_network(net, seed)
        return dataset
    from .augmentation import ClassifierAugmentation

    dataset = data.dataset("train", net.input_shape)
    dataset.augment(ClassifierAugmentation.from_network(net), seed)
    return dataset


def training_monitor(args, net, data, dataset, backup):
    """chart.png beside the backups (--chart or --map) and, with --map, the validation mAP
    every --map-every iterations (a detector whose .data file has valid=...)."""
    from .chart import TrainingChart
    from .validation import TrainingMonitor

    max_batches = args.max_batches or net.options.max_batches
    chart = TrainingChart(os.path.join(backup, "chart.png"), max_batches) \
        if args.chart or args.map else None
    valid_list, classes = None, 0
    if args.map:
        if not net.is_detector:
            raise ConfigError(f"{args.cfg}: --map measures a detector; this cfg has no [yolo] or "
                              "[region] layer")
        if "valid" not in data.values:
            raise ConfigError(f"{data.path}: --map needs a valid=... entry (the images to measure on)")
        valid_list, classes = data._file(data.values["valid"], "valid"), net.detected_classes
    return TrainingMonitor(net, backup, max_batches, chart, valid_list, classes, args.map_every,
                           len(dataset), args.backup_every)


def cmd_train(args):
    if args.gpus and len(args.gpus) > 1 and not distributed.launched_by_mpi():
        return distributed.relaunch_with_mpiexec(len(args.gpus), args.argv)
    group = args.group = distributed.process_group()
    loss_scale = (loss_scaling.parse_setting(args.loss_scale)
                  if args.loss_scale is not None else None)  # checked before any work
    data = data_config(args)
    net = build(args, seed=args.seed, weights=args.weights, rank=group.rank)
    if args.clear:
        net.seen = 0  # fine-tuning: the schedule starts over from these weights
    group.adopt(net)
    net.check_memory(net.options.mini_batch, train=True)  # before the images are loaded
    if group.rank == 0:
        print(models.layer_table(net), flush=True)  # as Darknet prints it while loading the cfg
    dataset = training_set(net, data, args.seed)
    backup = args.backup or data_io.resolve_path(data.backup, data.path)
    monitor = training_monitor(args, net, data, dataset, backup) if group.rank == 0 else None
    started = time.time()
    final = train(net, dataset, backup, max_batches=args.max_batches, seed=args.seed,
                  backup_every=args.backup_every, group=group, after_iteration=monitor,
                  loss_scale=loss_scale)
    if group.rank == 0:
        ranks = f" on {group.size} ranks" if group.size > 1 else ""
        print(f"Trained {net.seen} images{ranks} in {time.time() - started:.1f} s; weights: {final}")
    return 0


def cmd_test(args):
    data = data_config(args)
    net = build(args, weights=args.weights, inference=True)
    if net.is_detector:
        raise ConfigError(f"{args.cfg}: engine test measures a classifier's top-k accuracy; this "
                          "cfg is a detector: measure it with engine map")
    dataset = data.dataset("valid", net.input_shape)
    top = max(2, data.top)
    top1, topk = evaluate(net, dataset, top=top)
    print(f"top-1 {100 * top1:.2f}%  top-{top} {100 * topk:.2f}%  ({len(dataset)} images)")


def cmd_map(args):
    from . import evaluation, validation

    data = data_config(args)
    net = build(args, weights=args.weights, inference=True)
    if not net.is_detector:
        raise ConfigError(f"{args.cfg}: engine map measures a detector; this cfg has no [yolo] or "
                          "[region] layer (use engine test)")
    classes = net.detected_classes
    if classes != data.classes:
        raise ConfigError(f"{data.path}: classes={data.classes}, but {args.cfg} detects "
                          f"{classes} classes")
    if "valid" not in data.values:
        raise ConfigError(f"{data.path}: no valid=... entry (the images to measure on)")
    started = time.time()
    results = validation.detector_results(net, data._file(data.values["valid"], "valid"), classes)
    report = evaluation.darknet_map(results, classes, args.iou, args.points, args.thresh)
    print(f" detections_count = {report.detections}, unique_truth_count = {report.truths}  ")
    print(evaluation.format_report(report, data.labels, args.thresh, args.iou, args.points))
    print(f"Total Detection Time: {time.time() - started:.1f} Seconds", file=sys.stderr)


def cmd_calc_anchors(args):
    from . import anchors

    data = data_io.DataConfig(args.data)
    print(f" num_of_clusters = {args.num}, width = {args.width}, height = {args.height} ")
    found, average_iou, counts = anchors.calc_anchors(data, args.num, args.width, args.height,
                                                      args.seed)
    print(f" read labels: {int(counts.sum())} boxes")
    print(f"counters_per_class = {', '.join(str(int(c)) for c in counts)}")
    print(f" avg IoU = {100 * average_iou:2.2f} % ")
    line = anchors.anchors_line(found, args.width)
    with open("anchors.txt", "w") as handle:
        handle.write(line)
    print("Saving anchors to the file: anchors.txt ")
    print(f"anchors = {line}")


def cmd_predict(args):
    net = build(args, weights=args.weights, inference=True)
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


def cmd_info(args):
    net = Network(args.cfg, backend=get_backend("cpu"))
    print(models.layer_table(net))
    print(f"{models.parameter_count(net)} parameters; a .weights file of "
          f"{models.weights_file_bytes(net)} bytes")


def check_output_image(path):
    """Fail before any work if the drawn image cannot be written where --out says."""
    from PIL import Image

    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise DataError(f"{path}: the folder {folder} does not exist")
    extension = os.path.splitext(path)[1].lower()
    if extension not in Image.registered_extensions():
        raise DataError(f"{path}: unknown image format '{extension}'; use .png or .jpg")


def cmd_detect(args):
    check_output_image(args.out)
    net = build(args, weights=args.weights, inference=True)
    names = detection.read_names(args.names) if args.names else None
    choice = False if args.resize else (True if args.letterbox else None)
    labelled, detections, _ = detection.detect(net, args.image, args.thresh, args.nms,
                                               letterboxed=choice)
    classes = detections.probs.shape[1]
    for item in labelled:
        left, top, right, bottom = item.pixels
        found = ", ".join(f"{detection.class_name(names, k)}: {100 * p:.0f}%"
                          for k, p in zip(item.classes, item.probabilities))
        print(f"{found}  box (left, top, right, bottom) = ({left}, {top}, {right}, {bottom})")
    try:
        detection.draw(args.image, labelled, names, classes).save(args.out)
    except (OSError, ValueError) as error:
        raise DataError(f"{args.out}: cannot write the image ({error})") from None
    print(f"{len(labelled)} detections; drawn in {args.out}")


def cmd_partial(args):
    net = Network(args.cfg, backend=get_backend("cpu"))
    net.load_weights(args.weights)
    models.partial(net, args.out, args.layers)
    print(f"Saved the weights of layers 0..{min(args.layers, len(net.layers)) - 1} to {args.out}")


def cmd_fuse(args):
    net = Network(args.cfg, backend=get_backend("cpu"), darknet=args.darknet)
    net.load_weights(args.weights)
    models.fuse(net, args.cfg_out, args.weights_out)
    print(f"Fused network: {args.cfg_out}, {args.weights_out}")


def cmd_export(args):
    net = Network(args.cfg, backend=get_backend("cpu"), darknet=args.darknet)
    load_weights(net, args.weights)
    model = models.export_onnx(net, args.out, batch=args.batch, opset=args.opset, fp16=args.fp16,
                               decode=args.decode, nms=args.nms, thresh=args.thresh)

    def describe(value_info):
        dims = [d.dim_param or str(d.dim_value) for d in value_info.type.tensor_type.shape.dim]
        return f"{value_info.name} [{', '.join(dims)}]"

    print(f"Wrote {args.out} (opset {args.opset}, {'float16' if args.fp16 else 'float32'}): "
          f"input {describe(model.graph.input[0])}; outputs "
          + ", ".join(describe(v) for v in model.graph.output))


def cmd_mnist_detection(args):
    from . import mnist_detection

    started = time.time()
    data = mnist_detection.generate(args.out, train=args.train, valid=args.valid, size=args.size,
                                    seed=args.seed, min_digits=args.min_digits,
                                    max_digits=args.max_digits, min_digit=args.min_digit,
                                    max_digit=args.max_digit, max_overlap=args.max_overlap)
    print(f"Wrote {args.train} training and {args.valid} validation scenes in "
          f"{time.time() - started:.1f} s; data file: {data}")


def make_parser():
    parser = argparse.ArgumentParser(prog="engine", description="A Darknet-style neural-network engine.")
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("train", help="train a network on the data its .data file names")
    p.add_argument("cfg")
    p.add_argument("weights", nargs="?", help="start from these weights (same as --weights)")
    p.add_argument("--weights", dest="weights_option", help="start from these weights")
    p.add_argument("--data", help="the .data file (default: the one beside the cfg)")
    p.add_argument("--max-batches", type=positive_int, metavar="N",
                   help="train until iteration N (it replaces the cfg's max_batches, in the "
                        "learning-rate schedule too)")
    p.add_argument("--clear", action="store_true",
                   help="start the iteration count (and schedule) at 0 from the loaded weights, "
                        "to fine-tune rather than resume")
    p.add_argument("--seed", type=count, default=0,
                   help="seed for initialisation, batches, dropout")
    p.add_argument("--backup", help="folder for weights (default: the .data file's backup)")
    p.add_argument("--backup-every", type=count, default=100, metavar="N",
                   help="save <backup>/<cfg>.backup every N iterations (default 100; 0: never)")
    p.add_argument("--map", action="store_true",
                   help="a detector's validation mAP@0.50 while training (darknet's -map); the "
                        "best weights go to <backup>/<cfg>_best.weights")
    p.add_argument("--map-every", type=positive_int, metavar="N",
                   help="with --map: every N iterations (default: 4 epochs, at least 100)")
    p.add_argument("--chart", action="store_true",
                   help="draw <backup>/chart.png: the average loss, and mAP with --map (which "
                        "draws it too); needs matplotlib")
    p.add_argument("--loss-scale", metavar="dynamic|none|N",
                   help="loss scaling: dynamic (the default with --precision fp16: from 65536, "
                        "halved on overflow, doubled after 2000 good steps), none, or a fixed "
                        "scale N (default otherwise: the cfg's [net] loss_scale, else none)")
    add_backend_options(p, several=True)
    p.set_defaults(run=cmd_train)

    p = commands.add_parser("test", help="top-1/top-k accuracy on the .data file's valid set")
    p.add_argument("cfg")
    p.add_argument("weights")
    p.add_argument("--data", help="the .data file (default: the one beside the cfg)")
    add_backend_options(p)
    p.set_defaults(run=cmd_test)

    p = commands.add_parser("map", help="a detector's mAP on the .data file's valid set "
                                        "(darknet detector map)")
    p.add_argument("cfg")
    p.add_argument("weights")
    p.add_argument("--data", help="the .data file (default: the one beside the cfg)")
    p.add_argument("--thresh", type=unit_interval, default=0.25,
                   help="confidence threshold for TP/FP, precision, recall, F1, IoU (default 0.25)")
    p.add_argument("--iou", type=unit_interval, default=0.5, help="IoU for a true positive (default 0.5)")
    p.add_argument("--points", type=int, default=0, choices=(0, 11, 101),
                   help="0: area under the PR curve (default); 11: VOC 2007; 101: COCO")
    add_backend_options(p)
    p.set_defaults(run=cmd_map)

    p = commands.add_parser("calc_anchors", help="k-means anchors from the training labels "
                                                 "(darknet detector calc_anchors)")
    p.add_argument("data", help="the detector's .data file (its train list's label files)")
    p.add_argument("--num", "--num_of_clusters", type=positive_int, default=9, help="anchors (default 9)")
    p.add_argument("--width", type=positive_int, default=416, help="network width (default 416)")
    p.add_argument("--height", type=positive_int, default=416, help="network height (default 416)")
    p.add_argument("--seed", type=count, default=0, help="seed for the initial centres")
    p.set_defaults(run=cmd_calc_anchors)

    p = commands.add_parser("predict", help="classify image files")
    p.add_argument("cfg")
    p.add_argument("weights")
    p.add_argument("images", nargs="+")
    p.add_argument("--data", help="the .data file whose labels name the classes")
    p.add_argument("--top", type=positive_int, default=5)
    add_backend_options(p)
    p.set_defaults(run=cmd_predict)

    p = commands.add_parser("info", help="print the layer table: shapes and BFLOPs")
    p.add_argument("cfg")
    p.set_defaults(run=cmd_info)

    p = commands.add_parser("detect", help="detect objects in an image with a YOLO network")
    p.add_argument("cfg")
    p.add_argument("weights")
    p.add_argument("image")
    p.add_argument("--names", help="class names, one a line (e.g. cfg/coco.names)")
    p.add_argument("--thresh", type=unit_interval, default=0.5,
                   help="confidence threshold (default 0.5)")
    p.add_argument("--nms", type=unit_interval, default=0.45,
                   help="NMS IoU threshold; 0 turns NMS off")
    p.add_argument("--out", default="predictions.png", help="image with the boxes drawn")
    fit = p.add_mutually_exclusive_group()
    fit.add_argument("--resize", action="store_true",
                     help="stretch the image to the input (AlexeyAB's detector test; the default "
                          "for its cfgs without letter_box=1)")
    fit.add_argument("--letterbox", action="store_true",
                     help="letterbox the image (pjreddie's detector test; the default for its cfgs)")
    add_backend_options(p)
    p.set_defaults(run=cmd_detect)

    p = commands.add_parser("partial", help="save the first N layers' weights (Darknet's partial)")
    p.add_argument("cfg")
    p.add_argument("weights")
    p.add_argument("out")
    p.add_argument("layers", type=count, help="how many layers to keep (N)")
    p.set_defaults(run=cmd_partial)

    p = commands.add_parser("fuse", help="fold batch norms into the convolutions")
    p.add_argument("cfg")
    p.add_argument("weights")
    p.add_argument("cfg_out")
    p.add_argument("weights_out")
    p.add_argument("--darknet", choices=("pjreddie", "alexeyab"),
                   help="whose inference batch-norm rule to fold (default: the cfg tells)")
    p.set_defaults(run=cmd_fuse)

    p = commands.add_parser("export", help="write the network as an ONNX model")
    p.add_argument("cfg")
    p.add_argument("weights")
    p.add_argument("out", help="the .onnx file to write")
    p.add_argument("--batch", default="1", help="batch size of the input, or 'dynamic' (default 1)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17; 13 or later)")
    p.add_argument("--fp16", action="store_true", help="float16 weights, input and outputs")
    p.add_argument("--decode", action="store_true",
                   help="output Darknet's decoded boxes, objectness and scores instead of the "
                        "raw [yolo]/[region] outputs")
    p.add_argument("--nms", type=float, nargs="?", const=0.45, metavar="IOU",
                   help="decode and append NonMaxSuppression (IoU threshold, default 0.45)")
    p.add_argument("--thresh", type=unit_interval, default=0.5,
                   help="with --nms: keep scores above this (default 0.5, as engine detect)")
    p.add_argument("--darknet", choices=("pjreddie", "alexeyab"),
                   help="whose inference batch-norm rule to fold (default: the cfg tells)")
    p.set_defaults(run=cmd_export)


    p = commands.add_parser("mnist-detection",
                            help="write a detection set of MNIST digit scenes (Darknet's layout)")
    p.add_argument("out", help="folder for images/, labels/, train.txt, valid.txt and the .data file")
    p.add_argument("--train", type=count, default=10000, help="training scenes (default 10000)")
    p.add_argument("--valid", type=count, default=1000, help="validation scenes (default 1000)")
    p.add_argument("--size", type=positive_int, default=96,
                   help="scene width and height (default 96)")
    p.add_argument("--seed", type=count, default=0)
    p.add_argument("--min-digits", type=positive_int, default=1, help="digits per scene, at least")
    p.add_argument("--max-digits", type=positive_int, default=5, help="digits per scene, at most")
    p.add_argument("--min-digit", type=positive_int, help="smallest digit, pixels (default size/6)")
    p.add_argument("--max-digit", type=positive_int, help="largest digit, pixels (default size/2)")
    p.add_argument("--max-overlap", type=unit_interval, default=0.1,
                   help="largest IoU between two digits' boxes (default 0.1)")
    p.set_defaults(run=cmd_mnist_detection)
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = make_parser().parse_args(argv)
    args.argv = argv
    if getattr(args, "weights_option", None):
        args.weights = args.weights_option
    try:
        return args.run(args) or 0
    except EngineError as error:
        return fail(args, error)
    except KeyboardInterrupt:
        return 130
    except MemoryError:
        return fail(args, f"{getattr(args, 'cfg', '')}: out of host memory while running it; "
                          "lower batch, width/height or filters in the cfg (or raise "
                          "subdivisions, for training)")


def fail(args, message):
    """Print the one-line error; under mpiexec, name the rank and stop every rank."""
    message = " ".join(str(message).split())  # one line, whatever the message held
    if len(message) > MESSAGE_LIMIT:
        message = message[:MESSAGE_LIMIT] + "..."
    group = getattr(args, "group", None)
    if group is not None and group.size > 1:
        print(f"engine {args.command}: rank {group.rank}: error: {message}", file=sys.stderr)
        group.abort(1)  # the other ranks would wait for this one forever
    print(f"engine {args.command}: error: {message}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
