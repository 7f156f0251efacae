"""The ``"native"`` backend's C++ kernels, function by function, against float64 formulas written
here; the ``auto`` rule on CPU; the fallback when the kernels cannot be built; and a wheel
installed into a fresh virtual environment that builds and uses the kernels from its package data.

The shared suite (``test_losses.py`` and the others) also runs every public loss on ``"native"``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import site
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from reference import loss_dtype

import fastkd
from fastkd import _backend
from fastkd.backends import native

pytestmark = pytest.mark.skipif(not native.is_available(), reason="no C++ compiler for the kernels")

REPO = Path(__file__).resolve().parents[1]
FORWARD_KL = ("forward", 0.0, None)  # divergence, beta, labels of a logit kernel call
TINY = 2.0**-126  # exactly, as kTiny in attention.cpp (reference.TINY is a rounded literal)

# Student dtype, teacher dtype.
DTYPES = [
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16),
    (torch.float64, torch.float64),
    (torch.bfloat16, torch.float32),
    (torch.float32, torch.float16),
    (torch.float32, torch.float64),
]
DTYPE_IDS = [f"{str(s)[6:]}-{str(t)[6:]}" for s, t in DTYPES]


def rtol(dtype):
    """Tolerance of a result stored in ``dtype`` and computed in float32 (float64 for float64)."""
    return {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[
        dtype
    ]


def assert_close(got, want, tol, what):
    """Elementwise ``|got - want| <= tol * (|want| + max|want|)``, want computed in float64; where
    ``want`` is -inf (the stats of a row without entries), ``got`` must be -inf too."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    g, w = got.double(), want.double()
    none = torch.isneginf(w)
    assert torch.equal(torch.isneginf(g), none), f"{what}: -inf where {none.sum()} entries expect it"
    g, w = g[~none], w[~none]
    assert torch.isfinite(g).all(), f"{what}: non-finite values"
    bound = tol * (w.abs() + w.abs().max()) + 1e-30
    excess = ((g - w).abs() - bound).max().item()
    assert excess <= 0, f"{what}: max error {(g - w).abs().max().item():.3g} beyond {tol:g}"


def rows_view(base: torch.Tensor, layout: str) -> torch.Tensor:
    """A ``[R0, R1, C]`` view of a ``[4, 6, C + 3]`` tensor: contiguous rows, a slice with strides
    of its own (and an offset in the last dim), or transposed leading dims."""
    if layout == "contiguous":
        return base[..., :-3].contiguous()
    if layout == "sliced":
        return base[1:, ::2, 3:]
    return base[..., :-3].transpose(0, 1)


def random_mask(rows: int) -> torch.Tensor:
    mask = (torch.rand(rows) > 0.3).float()
    mask[0] = 0.0
    return mask


# ---------------------------------------------------------------------------------- formulas


def hidden_formula(s, t, mask):
    """(rows, d rows / d s as a function of grad_rows) in float64."""
    d = s.double() - t.double()
    rows = d.square().sum(-1).flatten() / s.shape[-1]
    valid = torch.ones_like(rows) if mask is None else mask.double()
    scale = 2 / s.shape[-1]
    return rows * valid, lambda g: scale * d * (g.double() * valid).view(*d.shape[:-1], 1)


def logit_formula(s, t, mask, temperature):
    """(rows, [lse_s, lse_t], grad function) in float64; p_v = 0 terms contribute 0."""
    x, y = s.double().flatten(0, 1) / temperature, t.double().flatten(0, 1) / temperature
    log_q, log_p = x.log_softmax(-1), y.log_softmax(-1)
    p, q = log_p.exp(), log_q.exp()
    kl = torch.where(p > 0, p * (log_p - log_q), 0).sum(-1)
    valid = torch.ones_like(kl) if mask is None else mask.double()
    lse = torch.stack([x.logsumexp(-1), y.logsumexp(-1)])

    def grad(g):
        return (temperature * (q - p) * (g.double() * valid)[:, None]).view(s.shape)

    return temperature**2 * kl * valid, torch.where(valid > 0, lse, -torch.inf), grad


def attention_formula(s, t, mask, kind):
    """(rows [B*H*Lq], stats, grad function) in float64 for one pair."""
    x, y = s.double(), t.double()
    batch, heads, lq, _ = s.shape
    valid = torch.ones(batch, 1, lq) if mask is None else mask[:, None]
    valid = valid.double()
    if kind == "probs":
        kl = torch.where(y > 0, y * (y.log() - x.clamp_min(TINY).log()), 0).sum(-1)

        def grad(g):
            dkl = torch.where((y > 0) & (x >= TINY), -y / x, 0)
            return dkl * (g.double().view(batch, heads, lq) * valid)[..., None]

        return (kl * valid).flatten(), torch.zeros(2, 0, dtype=torch.float64), grad
    keep = (s > torch.finfo(s.dtype).min) & (t > torch.finfo(t.dtype).min)
    if mask is not None:
        keep = keep & (mask != 0)[:, None, None, :]
    x, y = x.masked_fill(~keep, -torch.inf), y.masked_fill(~keep, -torch.inf)
    some = keep.any(-1)
    lse_s = torch.where(some, x.logsumexp(-1), 0)
    lse_t = torch.where(some, y.logsumexp(-1), 0)
    q = torch.where(keep, (x - lse_s[..., None]).exp(), 0)
    p = torch.where(keep, (y - lse_t[..., None]).exp(), 0)
    log_ratio = torch.where(keep, (y - lse_t[..., None]) - (x - lse_s[..., None]), 0)
    kl = (p * log_ratio).sum(-1)
    counts = some & (valid > 0)  # rows without a kept key, or masked, have stats -inf
    stats = torch.stack([torch.where(counts, lse_s, -torch.inf), torch.where(counts, lse_t, -torch.inf)]).flatten(1)

    def grad(g):
        return (q - p) * (g.double().view(batch, heads, lq) * valid)[..., None]

    return (kl * valid).flatten(), stats, grad


# ------------------------------------------------------------------------------------ hidden


@pytest.mark.parametrize("s_dtype,t_dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("layout", ["contiguous", "sliced", "transposed"])
def test_hidden_pairs(s_dtype, t_dtype, layout):
    """Two pairs of different widths (one wider than a kernel block), masked rows, any strides."""
    widths = (37, 2100)
    students = [rows_view(torch.randn(4, 6, c + 3).to(s_dtype), layout) for c in widths]
    teachers = [rows_view(torch.randn(4, 6, c + 3).to(t_dtype), layout) for c in widths]
    rows_per_pair = students[0].shape[0] * students[0].shape[1]
    mask = random_mask(rows_per_pair)
    rows = native.hidden_forward(students, teachers, mask)
    grad_rows = torch.randn(rows.shape, dtype=rows.dtype)
    grads = native.hidden_backward(students, teachers, mask, grad_rows)
    offset = 0
    for s, t, grad in zip(students, teachers, grads):
        want, want_grad = hidden_formula(s, t, mask)
        assert rows.dtype == loss_dtype(s, t)
        assert_close(rows[offset : offset + rows_per_pair], want, rtol(loss_dtype(s, t)), "rows")
        assert grad.dtype == s.dtype and grad.is_contiguous()
        assert_close(grad, want_grad(grad_rows[offset : offset + rows_per_pair]),
                     rtol(s.dtype), "grad")
        offset += rows_per_pair


# ------------------------------------------------------------------------------------- logit


@pytest.mark.parametrize("s_dtype,t_dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("layout", ["contiguous", "sliced", "transposed"])
def test_logit(s_dtype, t_dtype, layout):
    """Vocab 2531 (two full kernel blocks and a tail), temperature 1.7, masked rows."""
    s = rows_view((torch.randn(4, 6, 2534) * 4).to(s_dtype), layout)
    t = rows_view((torch.randn(4, 6, 2534) * 4).to(t_dtype), layout)
    mask = random_mask(s.shape[0] * s.shape[1])
    rows, _, stats = native.logit_forward(s, t, mask, 1.7, *FORWARD_KL)
    want, want_stats, want_grad = logit_formula(s, t, mask, 1.7)
    tol = rtol(loss_dtype(s, t))
    assert rows.dtype == loss_dtype(s, t) and stats.dtype == torch.float64
    assert_close(rows, want, tol, "rows")
    assert_close(stats[:2], want_stats, tol, "stats")
    grad_rows = torch.randn(rows.shape, dtype=rows.dtype)
    grad = native.logit_backward(s, t, mask, 1.7, *FORWARD_KL, stats, grad_rows, None)
    assert grad.dtype == s.dtype and grad.is_contiguous()
    assert_close(grad, want_grad(grad_rows), rtol(s.dtype), "grad")


@pytest.mark.parametrize("temperature", [0.05, 1.0, 30.0])
def test_logit_extremes(temperature):
    """Logits of +-1e4 (exp(x - lse) needs the float64 lse), teacher -inf entries (p = 0, no NaN)
    and a maximum that arrives only in the last block (the running maximum rescales)."""
    s = (torch.rand(1, 5, 3000) * 2 - 1) * 1e4
    t = (torch.rand(1, 5, 3000) * 2 - 1) * 1e4
    t[0, 1, ::7] = -torch.inf
    t[0, 2, -1] = 2e4
    s[0, 3, -5] = 2e4
    rows, _, stats = native.logit_forward(s, t, None, temperature, *FORWARD_KL)
    want, want_stats, want_grad = logit_formula(s, t, None, temperature)
    assert_close(rows, want, 1e-5, "rows")
    assert_close(stats[:2], want_stats, 1e-7, "stats")
    grad_rows = torch.rand(5)
    assert_close(native.logit_backward(s, t, None, temperature, *FORWARD_KL, stats, grad_rows, None),
                 want_grad(grad_rows), 1e-5, "grad")


# --------------------------------------------------------------------------------- attention


def attention_inputs(kind, shape, s_dtype, t_dtype, causal):
    s, t = (torch.randn(shape) * 2).to(s_dtype), (torch.randn(shape) * 2).to(t_dtype)
    if causal:  # left padding plus a causal mask: the student uses -inf, the teacher finfo.min
        future = torch.ones(shape[-2], shape[-1], dtype=torch.bool).triu(1)
        s = s.masked_fill(future, -torch.inf)
        t = t.masked_fill(future, torch.finfo(t_dtype).min)
    if kind == "probs":
        s, t = s.softmax(-1), t.softmax(-1)
        t[..., 0, :] = 0.0  # a teacher row of zeros
    return s, t


@pytest.mark.parametrize("s_dtype,t_dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("kind", ["probs", "scores"])
@pytest.mark.parametrize("masked", [False, True])
def test_attention_pairs(s_dtype, t_dtype, kind, masked):
    """Two pairs of different head counts; query/key mask with left padding and causal scores."""
    batch, length = 2, 37
    shapes = [(batch, 3, length, length), (batch, 2, length, length)]
    pairs = [attention_inputs(kind, shape, s_dtype, t_dtype, causal=i == 1)
             for i, shape in enumerate(shapes)]
    students, teachers = [p[0] for p in pairs], [p[1] for p in pairs]
    mask = None
    if masked:
        mask = torch.ones(batch, length)
        mask[0, :5] = 0.0  # left padding: with the causal pair, rows 5.. of batch 0 keep keys 5..
        mask[1, -2:] = 0.0
    rows, stats = native.attention_forward(students, teachers, mask, kind)
    grad_rows = torch.randn(rows.shape, dtype=rows.dtype)
    grads = native.attention_backward(students, teachers, mask, kind, stats, grad_rows)
    offset = 0
    for s, t, grad in zip(students, teachers, grads):
        count = s.shape[0] * s.shape[1] * s.shape[2]
        want, want_stats, want_grad = attention_formula(s, t, mask, kind)
        tol = rtol(loss_dtype(s, t))
        assert rows.dtype == loss_dtype(s, t) and stats.dtype == torch.float64
        assert_close(rows[offset : offset + count], want, tol, "rows")
        if kind == "scores":
            assert_close(stats[:, offset : offset + count], want_stats, tol, "stats")
        assert grad.dtype == s.dtype and grad.is_contiguous()
        assert_close(grad, want_grad(grad_rows[offset : offset + count]), rtol(s.dtype), "grad")
        offset += count
    assert stats.shape == (2, offset if kind == "scores" else 0)


def test_attention_long_rows_and_empty_rows():
    """Keys beyond one kernel block; rows whose keys are all dropped give 0, never NaN."""
    s, t = torch.randn(1, 2, 3, 2500), torch.randn(1, 2, 3, 2500)
    s[0, 0, 1] = -torch.inf
    t[0, 1, 2, :1300] = torch.finfo(torch.float32).min
    s[0, 1, 2, 1300:] = -torch.inf
    rows, stats = native.attention_forward([s], [t], None, "scores")
    want, want_stats, want_grad = attention_formula(s, t, None, "scores")
    assert rows[1] == 0 and rows[5] == 0 and torch.isneginf(stats[:, 1]).all()
    assert_close(rows, want, 1e-5, "rows")
    assert_close(stats, want_stats, 1e-5, "stats")
    grad_rows = torch.rand(6)
    (grad,) = native.attention_backward([s], [t], None, "scores", stats, grad_rows)
    assert grad[0, 0, 1].eq(0).all()
    assert_close(grad, want_grad(grad_rows), 1e-5, "grad")


# ------------------------------------------------------------------------------ whole backend


def test_threads_do_not_change_results():
    """Rows are independent: one thread and all threads give bitwise equal results."""
    s, t = torch.randn(1, 64, 3000), torch.randn(1, 64, 3000)
    labels = torch.randint(0, 3000, (64,))
    rows, ce_rows, stats = native.logit_forward(s, t, None, 2.0, "jsd", 0.3, labels)
    grad = native.logit_backward(s, t, None, 2.0, "jsd", 0.3, labels, stats, torch.ones(64), torch.ones(64))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows1, ce_rows1, stats1 = native.logit_forward(s, t, None, 2.0, "jsd", 0.3, labels)
        grad1 = native.logit_backward(s, t, None, 2.0, "jsd", 0.3, labels, stats1, torch.ones(64), torch.ones(64))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(rows, rows1) and torch.equal(ce_rows, ce_rows1)
    assert torch.equal(stats, stats1) and torch.equal(grad, grad1)


def test_auto_on_cpu_is_native():
    fastkd.set_backend("auto")
    assert "native" in fastkd.available_backends()
    assert _backend.resolve(torch.device("cpu")) == "native"


def test_unbuildable_kernels_warn_once_and_fall_back(monkeypatch):
    """When the build fails, is_available warns once (naming the reason) and auto picks torch."""
    monkeypatch.setattr(native, "_load", lambda: "CalledProcessError: no compiler")
    native._warn_once.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="no compiler"):
            assert not native.is_available()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert not native.is_available()
            assert _backend.resolve(torch.device("cpu")) == "torch"
        with pytest.raises(RuntimeError, match="no compiler"):
            native.logit_forward(torch.zeros(1, 1, 3), torch.zeros(1, 1, 3), None, 1.0, *FORWARD_KL)
    finally:
        native._warn_once.cache_clear()


def can_build_wheels() -> bool:
    """setuptools >= 70.1 builds wheels itself; older ones need the ``wheel`` package."""
    if importlib.util.find_spec("setuptools") is None:
        return False
    if importlib.util.find_spec("wheel") is not None:
        return True
    import setuptools

    return tuple(int(part) for part in setuptools.__version__.split(".")[:2]) >= (70, 1)


def outer_site_dirs() -> list[str]:
    """The site directories of the environment running the tests (a venv's own, plus the base
    interpreter's and the user's where that environment sees them)."""
    dirs = list(site.getsitepackages())
    if site.ENABLE_USER_SITE:
        dirs.append(site.getusersitepackages())
    return [d for d in dirs if os.path.isdir(d)]


@pytest.mark.slow
def test_wheel_in_fresh_venv_uses_native_kernels(tmp_path):
    """``pip install .`` of a copy of the repository into a new virtual environment; a loss run
    from outside the repository resolves to "native" and builds the kernels from the installed
    package data (in an empty extensions cache, so the build is that of the installed sources)."""
    assert can_build_wheels(), (
        "pip cannot build a wheel without isolation here: the test extra's setuptools>=70.1 "
        '(pip install -e ".[test]") is missing'
    )
    source = tmp_path / "src"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", "__pycache__", "*.egg-info", "build", "dist", ".pytest_cache", "results"))
    venv = tmp_path / "venv"
    # Without a pip of its own, the venv runs this environment's pip, setuptools (which builds
    # wheels without the "wheel" package) and torch: a .pth file puts this environment's site
    # directories on its path, after its own (their .pth files, such as that of an editable
    # fastkd, are not run). It installs into the venv. Not --system-site-packages: that gives the
    # base interpreter's packages, not this environment's when the tests run in a venv (in a plain
    # one made from a fresh Python: no torch, and a setuptools 65 that cannot build wheels).
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             check=True, capture_output=True, text=True).stdout.strip()
    Path(purelib, "outer.pth").write_text("".join(f"{d}\n" for d in outer_site_dirs()))
    subprocess.run([python, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    str(source)], check=True, cwd=tmp_path)
    shutil.rmtree(source)  # nothing may come from the copy once installed
    script = textwrap.dedent("""
        import sys, torch, fastkd
        from fastkd import _backend
        from fastkd.backends import native
        s = torch.randn(3, 5, 100, requires_grad=True)
        fastkd.logit_kl(s, torch.randn(3, 5, 100), temperature=2.0).backward()
        print(_backend.resolve(s.device))
        print(fastkd.__file__)
        print(native._kernel_file("logit.cpp"))
        print(hasattr(torch.ops.fastkd_native, "logit_forward"))
    """)
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "extensions")}
    env.pop("FASTKD_BACKEND", None)
    out = subprocess.run([python, "-c", script], check=True, cwd=tmp_path, env=env,
                         capture_output=True, text=True).stdout.split()
    venv_lib = str(venv / "lib")
    assert out[0] == "native"
    assert out[1].startswith(venv_lib) and out[2].startswith(venv_lib), out
    assert Path(out[2]).name == "logit.cpp" and out[3] == "True"
    assert list((tmp_path / "extensions").glob("*/fastkd_native_*.so"))
