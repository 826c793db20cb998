"""chart.png: the training chart AlexeyAB's Darknet draws (draw_train_loss): the running average
loss over the iterations, and with `engine train --map` the validation mAP@0.50 in red, each
point labelled. Drawn with matplotlib (the `chart` extra); without it no chart is written.
"""

import os
import sys

from .errors import TrainingError


class TrainingChart:
    """Collects (iteration, average loss) and (iteration, mAP) points; `save` redraws the file."""

    def __init__(self, path, max_batches):
        self.path, self.max_batches = path, max_batches
        self.losses, self.maps = [], []
        self.available = True

    def add_loss(self, iteration, average_loss):
        self.losses.append((iteration, average_loss))

    def add_map(self, iteration, value):
        self.maps.append((iteration, value))

    def save(self):
        if not self.available or not self.losses:
            return None
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            self.available = False
            print("No chart.png: matplotlib is not installed (pip install -e '.[chart]')",
                  file=sys.stderr)
            return None
        figure, loss_axis = plt.subplots(figsize=(8, 6), dpi=100)
        iterations, losses = zip(*self.losses)
        loss_axis.plot(iterations, losses, color="tab:blue", linewidth=1)
        loss_axis.set_xlim(0, self.max_batches)
        loss_axis.set_ylim(0, max(min(max(losses), 4 * sorted(losses)[len(losses) // 2]), 1e-6)
                           * 1.05)
        loss_axis.set_xlabel("iteration")
        loss_axis.set_ylabel("average loss", color="tab:blue")
        loss_axis.grid(alpha=0.3)
        title = f"iteration {iterations[-1]}, average loss {losses[-1]:.4f}"
        if self.maps:
            map_axis = loss_axis.twinx()
            steps, values = zip(*self.maps)
            map_axis.plot(steps, [100 * v for v in values], color="tab:red", marker="o",
                          linewidth=1)
            for step, value in self.maps:
                map_axis.annotate(f"{100 * value:.0f}%", (step, 100 * value),
                                  textcoords="offset points", xytext=(0, 6), ha="center",
                                  color="tab:red", fontsize=8)
            map_axis.set_ylim(0, 105)
            map_axis.set_ylabel("mAP@0.50 %", color="tab:red")
            title += f", last mAP@0.50 {100 * values[-1]:.2f}%, best {100 * max(values):.2f}%"
        loss_axis.set_title(title, fontsize=10)
        figure.tight_layout()
        temporary = self.path + ".tmp.png"
        try:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            figure.savefig(temporary)
            os.replace(temporary, self.path)
        except OSError as error:
            reason = error.strerror or error
            raise TrainingError(f"{self.path}: cannot write the chart ({reason})") from None
        finally:
            plt.close(figure)
        return self.path
