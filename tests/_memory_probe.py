"""Run one hypergradient in a fresh process and print the growth of peak RSS (MB) it caused."""

import resource
import sys

import torch

import bilevel as B

torch.manual_seed(0)
torch.set_num_threads(1)
method, steps = sys.argv[1], int(sys.argv[2])
d, hdim, n = 256, 1024, 512  # ~0.53M weights; one weight vector is 4 MB in float64
W1 = torch.randn(hdim, d, dtype=torch.float64) / d**0.5
W2 = torch.randn(1, hdim, dtype=torch.float64) / hdim**0.5
X, y = torch.randn(n, d, dtype=torch.float64), torch.randn(n, 1, dtype=torch.float64)


def loss(p, X, y):
    return ((torch.tanh(X @ p["W1"].T) @ p["W2"].T - y) ** 2).mean()


inner = lambda p, h: loss(p, X, y) + 0.5 * h["wd"].exp() * sum((v**2).sum() for v in p.values())  # noqa: E731
outer = lambda p, h: loss(p, X[:64], y[:64])  # noqa: E731
p, h = {"W1": W1, "W2": W2}, {"wd": torch.tensor(1.0, dtype=torch.float64)}
B.hypergradient(outer, p, h, inner=inner, solver=B.Identity())  # warm-up: allocator, kernels


def peak_kb() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


# reset the peak (ru_maxrss would also carry the forking parent's peak)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = peak_kb()
if method == "neumann":
    B.hypergradient(outer, p, h, inner=inner, solver=B.Neumann(steps, alpha=0.01))
elif method == "cg":
    B.hypergradient(outer, p, h, inner=inner, solver=B.ConjugateGradient(steps, tol=0.0))
else:
    B.unrolled_hypergradient(outer, p, h, inner=inner, lr=0.01, steps=steps)
print((peak_kb() - before) / 1024)
