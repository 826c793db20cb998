"""A detector run over a .data file's validation list, as `darknet detector map` runs it: each
image resized to the network input (Darknet's IMAGE_DATA when letter_box is off), every
detection layer's boxes kept above a 0.005 confidence, do_nms_sort at 0.45, and each (box,
class) with a probability above 0 handed to engine.evaluation with the image's label file.
"""

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .config import resolve_path
from .data import read_image_list
from .detection import network_detections, nms_sort, read_rgb, resize_bilinear
from .detection_data import label_path, read_boxes
from .evaluation import ImageResult

MAP_THRESH = 0.005  # validate_detector_map's detection threshold
MAP_NMS = 0.45


def _load(path, width, height):
    return resize_bilinear(read_rgb(path), width, height)


def detector_results(net, list_path, classes, batch_size=16):
    """ImageResult for every image of the list (truths from its label file; none if missing)."""
    paths = [resolve_path(p, list_path) for p in read_image_list(list_path)]
    width, height = net.options.width, net.options.height
    results = []
    with ThreadPoolExecutor(max_workers=4) as pool:  # decoding overlaps the network's work
        batches = [paths[i:i + batch_size] for i in range(0, len(paths), batch_size)]
        pending = pool.map(lambda chunk: np.stack([_load(p, width, height) for p in chunk]), batches)
        for chunk, images in zip(batches, pending):
            net.forward(net.ops.asarray(images), train=False)
            for b, path in enumerate(chunk):
                # The image is the network's size here, so no letterbox correction applies.
                found = nms_sort(network_detections(net, width, height, MAP_THRESH, b), MAP_NMS)
                box_index, class_index = np.nonzero(found.probs > 0)
                truth = read_boxes(label_path(path), classes)
                truth = np.zeros((0, 5), np.float32) if truth is None else truth
                results.append(ImageResult.make(truth[:, :4], truth[:, 4],
                                                found.boxes[box_index],
                                                found.probs[box_index, class_index], class_index))
    return results
