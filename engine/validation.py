"""A detector run over a .data file's validation list, as `darknet detector map` runs it: each
image resized to the network input (Darknet's IMAGE_DATA), or letterboxed into it with
`[net] letter_box=1` (LETTERBOX_DATA, the boxes then mapped back to the image), every
detection layer's boxes kept above a 0.005 confidence, do_nms_sort at 0.45, and each (box,
class) with a probability above 0 handed to engine.evaluation with the image's label file.
Also what engine train watches while it trains (TrainingMonitor: chart.png, --map).
"""

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .config import resolve_path
from .detection import letterbox, network_detections, nms_sort
from .detection_data import label_path, read_boxes
from .evaluation import ImageResult
from .images import read_image_list, read_rgb, resize_bilinear

MAP_THRESH = 0.005  # validate_detector_map's detection threshold
MAP_NMS = 0.45


def _load(path, width, height, letter_box):
    """(image at the network's size, the image file's (width, height))."""
    image = read_rgb(path)
    size = image.shape[2], image.shape[1]
    if letter_box:
        return letterbox(image, width, height), size
    return resize_bilinear(image, width, height), size


def detector_results(net, list_path, classes, batch_size=16):
    """ImageResult for every image of the list (truths from its label file; none if missing)."""
    paths = [resolve_path(p, list_path) for p in read_image_list(list_path)]
    width, height = net.options.width, net.options.height
    letter_box = net.options.section.bool("letter_box", False)
    heads = [layer.index for layer in net.detection_layers]
    results = []
    with ThreadPoolExecutor(max_workers=4) as pool:  # decoding overlaps the network's work
        batches = [paths[i:i + batch_size] for i in range(0, len(paths), batch_size)]
        pending = pool.map(lambda chunk: [_load(p, width, height, letter_box) for p in chunk],
                           batches)
        for chunk, loaded in zip(batches, pending):
            # Eager (predict would record an inference graph beside training's, and check its
            # memory); the heads come back once per batch, checked finite.
            net.forward(net.ops.asarray(np.stack([image for image, _ in loaded])), train=False)
            outputs, finite = net.ops.output_reader([net.outputs[i] for i in heads]).values()
            if not finite:
                net.raise_non_finite()
            for b, path in enumerate(chunk):
                # Resized: boxes are relative to the image as they are (the letterbox
                # correction for an image of the network's size is none).
                image_w, image_h = loaded[b][1] if letter_box else (width, height)
                found = nms_sort(network_detections(net, image_w, image_h, MAP_THRESH, b,
                                                    outputs=outputs), MAP_NMS)
                box_index, class_index = np.nonzero(found.probs > 0)
                truth = read_boxes(label_path(path), classes)
                truth = np.zeros((0, 5), np.float32) if truth is None else truth
                results.append(ImageResult.make(truth[:, :4], truth[:, 4],
                                                found.boxes[box_index],
                                                found.probs[box_index, class_index], class_index))
    return results


class TrainingMonitor:
    """What `engine train` does after each iteration: the chart's loss point (chart.png redrawn
    with every backup, each mAP and at the end) and, with --map, the validation mAP@0.50 as
    AlexeyAB's `detector train -map` computes it: every `every` iterations (default: 4 epochs,
    at least 100, not before burn_in) and at the last one, saving <backup>/<cfg>_best.weights
    whenever it is the best so far."""

    def __init__(self, net, backup_dir, max_batches, chart=None, valid_list=None, classes=0,
                 every=None, train_images=0, backup_every=100):
        self.net, self.chart, self.valid_list, self.classes = net, chart, valid_list, classes
        self.backup_every = backup_every
        batch = net.options.batch_size
        self.every = every or max(4 * train_images // batch, 100)
        self.next_map = max(self.every, net.options.burn_in)
        base = os.path.splitext(os.path.basename(net.cfg_path))[0]
        self.best_path = os.path.join(backup_dir, f"{base}_best.weights")
        self.best = None
        self.max_batches = max_batches

    def measure(self):
        """mAP@0.50 at the cfg's input size (random=1 may have resized the network)."""
        from .evaluation import darknet_map
        from .multiscale import resize_network

        net, section = self.net, self.net.options.section
        size = net.options.width, net.options.height
        resize_network(net, section.int("width", size[0]), section.int("height", size[1]))
        try:
            return darknet_map(detector_results(net, self.valid_list, self.classes),
                               self.classes).mean_ap
        finally:
            resize_network(net, *size)

    def __call__(self, iteration, loss, average_loss, last):
        report = None
        if self.chart is not None:
            self.chart.add_loss(iteration, average_loss)
        if self.valid_list and (iteration >= self.next_map or last):
            value = self.measure()
            self.next_map = iteration + self.every
            report = f"mAP@0.50 = {value:.4f} at iteration {iteration}"
            if self.best is None or value >= self.best:
                self.best = value
                self.net.save_weights(self.best_path)
                report += f"; new best, saved {self.best_path}"
            else:
                report += f" (best {self.best:.4f})"
            if self.chart is not None:
                self.chart.add_map(iteration, value)
        if self.chart is not None and (report or last or (self.backup_every and
                                                          iteration % self.backup_every == 0)):
            self.chart.save()
        return report
