import numpy as np
from engine.backends import get_backend
cpu, gpu = get_backend("cpu"), get_backend("gpu")
rng = np.random.default_rng(0)
def cmp(name, a, b):
    a, b = np.asarray(a), gpu.to_host(b)
    print(f"{name}: max abs diff {np.abs(a - b).max():.2e}")
x = rng.standard_normal((2, 8, 6, 6)).astype(np.float32)
s = rng.standard_normal((2, 4, 12, 12)).astype(np.float32)
cmp("shortcut_forward", cpu.shortcut_forward(x, s, 0.5, 2.0), gpu.shortcut_forward(gpu.asarray(x), gpu.asarray(s), 0.5, 2.0))
for i, (c, g) in enumerate(zip(cpu.shortcut_backward(x, s.shape[1:], 0.5, 2.0), gpu.shortcut_backward(gpu.asarray(x), s.shape[1:], 0.5, 2.0))):
    cmp(f"shortcut_backward[{i}]", c, g)
y = rng.standard_normal((2, 2 * 9, 3, 3)).astype(np.float32)
cmp("anchor_activate yolo", cpu.anchor_activate(y, 2, ((0, 2), (4, 9))), gpu.anchor_activate(gpu.asarray(y), 2, ((0, 2), (4, 9))))
cmp("anchor_activate region", cpu.anchor_activate(y, 2, ((0, 2), (4, 5)), (5, 9)), gpu.anchor_activate(gpu.asarray(y), 2, ((0, 2), (4, 5)), (5, 9)))
for fwd in (False, True):
    cmp(f"reorg forward={fwd}", cpu.reorg(x, 2, fwd, (8, 6, 6), (32, 3, 3) if not fwd else (2, 12, 12)),
        gpu.reorg(gpu.asarray(x), 2, fwd, (8, 6, 6), (32, 3, 3) if not fwd else (2, 12, 12)))
try:
    cmp("crop", cpu.crop(x, 1, 2, 3, 3, True, 2, -1), gpu.crop(gpu.asarray(x), 1, 2, 3, 3, True, 2, -1))
except AttributeError as e:
    print("crop: missing on the GPU backend:", e)
