"""What it costs: the benchmark suite behind ``benchmarks/run.py`` and the book's appendix.

Every comparison is measured *side by side in one run*: the variants of a comparison are timed
in interleaved repetitions (the order rotates each repetition), after a warm-up, and each
reports the median of its repetitions. Ratios therefore compare numbers taken under the same
machine load. CUDA timings synchronise the device before and after each repetition only.

Measured, with the budget each must meet:

- **guidance**: one EDM sampler step (Euler + Heun) of an unguided MLP denoiser vs the same
  step with discriminator guidance on the Euler slope (the DG default), vs one discriminator
  forward + backward alone. Overhead ratio ``(guided - unguided) / (disc f+b)`` <= 1.2, for a
  discriminator as large as the denoiser and a smaller one.
- **training**: one KL-objective discriminator training step (double backprop through the
  discriminator plus a frozen denoiser forward) vs one cross-entropy step, same discriminator
  and batch size: ratio <= 2.
- **likelihood**: ODE log-likelihood throughput in 2-D and the time of the exact 2-D
  ``kl_divergence`` on 2000 points with a 3x256 SiLU MLP denoiser at the default ODE settings:
  <= 15 s.
- **chapters**: each chapter of the book at its default (quick) parameters; whole book
  <= 10 min.
"""
from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

__all__ = ["machine_info", "time_interleaved", "bench_guidance", "bench_training",
           "bench_likelihood", "bench_ode_accuracy", "bench_chapters", "run_benchmarks",
           "format_markdown", "format_table", "SIZES"]

# Problem sizes per setting. "small" is the CI / book-appendix size (CPU, well under a minute);
# "cpu" the default on a CPU; "cuda" the default on a GPU (large batches, where a GPU pays off).
SIZES = {
    "small": dict(sample_batch=1000, sample_steps=6, train_batch=256, kl_points=2000,
                  kl_steps=8, reps=13, train_inner=5),
    "cpu": dict(sample_batch=2000, sample_steps=6, train_batch=256, kl_points=2000,
                kl_steps=None, reps=21, train_inner=10),
    "cuda": dict(sample_batch=65536, sample_steps=18, train_batch=4096, kl_points=2000,
                 kl_steps=None, reps=9, train_inner=20),
}

BUDGETS = {
    "guidance_overhead": 1.2,     # (guided - unguided) / (disc f+b)
    "kl_vs_ce_step": 2.0,         # KL training step / CE training step
    "kl_2000_seconds": 15.0,      # exact 2-D KL on 2000 points, default ODE settings
    "book_seconds": 600.0,        # the whole book at its default parameters
}


# ---------------------------------------------------------------------------------------------
# Machine and timing
# ---------------------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine_info(device=None) -> dict:
    """The machine a table was measured on: CPU model, cores, torch version, threads, device."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    info = {"cpu": _cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version(), "threads": torch.get_num_threads(),
            "device": str(dev)}
    try:
        info["load_average"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        pass
    if dev.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(dev)
    return info


def default_clock(device):
    """The clock the suite uses: the process's CPU time on a CPU device, wall time on CUDA.

    On a shared machine other processes steal wall time but not this process's CPU time, so
    with one torch thread CPU time is the steadier measure of what a computation costs. (It
    still sees cache and memory-bandwidth contention.) GPU work needs wall time.
    """
    if torch.device(device).type == "cpu" and CLOCK["cpu"] == "process":
        return time.process_time
    return time.perf_counter


CLOCK = {"cpu": "process"}   # set to "wall" to time CPU runs by the wall clock


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(fns: dict, *, device="cpu", reps: int = 5, inner: int = 1,
                     warmup: int = 1, clock=None) -> dict:
    """Median seconds per call of each ``fns[name]()``, timed side by side.

    Each function is called ``warmup`` times first; then ``reps`` rounds, each timing ``inner``
    calls of every function in an order that rotates from round to round (so slow drifts of the
    machine load hit all variants alike). Returns ``{name: median seconds per call}`` and, under
    the key ``"_samples"``, every round's time.

    ``clock`` defaults to :func:`default_clock` (process CPU time on a CPU device, wall time on
    CUDA).
    """
    device = torch.device(device)
    clock = default_clock(device) if clock is None else clock
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    _sync(device)
    samples = {n: [] for n in names}
    for r in range(reps):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            _sync(device)
            t0 = clock()
            for _ in range(inner):
                fns[name]()
            _sync(device)
            samples[name].append((clock() - t0) / inner)
    out = {n: statistics.median(v) for n, v in samples.items()}
    out["_samples"] = samples
    return out


def _round_median(samples: dict, fn, *names) -> float:
    """Median over rounds of ``fn(t_name1, t_name2, ...)``: a ratio taken within each round
    (where the variants ran seconds apart) is steadier than a ratio of medians."""
    return statistics.median(fn(*vals) for vals in zip(*(samples[n] for n in names)))


def _row(section, name, value, unit, budget=None, ok=None, note=""):
    return {"section": section, "name": name, "value": value, "unit": unit,
            "budget": budget, "ok": ok, "note": note}


# ---------------------------------------------------------------------------------------------
# Guidance: sampler step with and without a discriminator
# ---------------------------------------------------------------------------------------------
def bench_guidance(device="cpu", *, sample_batch=2000, sample_steps=18, reps=5, seed=0,
                   disc_sizes=(("as large as the denoiser (3x256)", 256, 3),
                               ("smaller (3x128)", 128, 3)), **_) -> list:
    """Unguided vs DG-guided EDM sampler step, and one discriminator forward + backward."""
    import dgref
    from dgref.discriminator import Discriminator, dg_sampler_kwargs, logit_and_grad

    device = torch.device(device)
    torch.manual_seed(seed)
    data = dgref.ring()
    den = dgref.mlp_denoiser(2, data.std()).to(device).eval()
    for p in den.parameters():
        p.requires_grad_(False)       # a frozen, pretrained model
    gen = torch.Generator(device=device).manual_seed(seed)
    latents = torch.randn((sample_batch, 2), generator=gen, device=device)
    x_mid = latents * 1.0
    sig_mid = torch.full((sample_batch,), 1.0, device=device)
    rows = []
    for label, hidden, depth in disc_sizes:
        disc = Discriminator(2, data.std(), hidden=hidden, depth=depth).to(device).eval()
        kw = dg_sampler_kwargs(den, disc, weight=1.0, window=None, slopes="euler")

        def unguided():
            return dgref.edm_sampler(den, latents, num_steps=sample_steps, check_finite=False)

        def guided():
            return dgref.edm_sampler(latents=latents, num_steps=sample_steps,
                                     check_finite=False, **kw)

        def disc_fb():
            return logit_and_grad(disc, x_mid, sig_mid)

        t = time_interleaved({"unguided": unguided, "guided": guided, "disc": disc_fb},
                             device=device, reps=reps, warmup=1)
        # Per sampler step; the guided run makes exactly one discriminator call per step.
        t_u, t_g, t_d = t["unguided"] / sample_steps, t["guided"] / sample_steps, t["disc"]
        ratio = _round_median(t["_samples"], lambda u, g, d: (g - u) / sample_steps / d,
                              "unguided", "guided", "disc")
        sec = f"guidance, disc {label}"
        note = f"batch {sample_batch}, {sample_steps} steps, guidance on the Euler slope"
        rows += [_row(sec, "unguided sampler step", t_u * 1e3, "ms", note=note),
                 _row(sec, "guided sampler step", t_g * 1e3, "ms"),
                 _row(sec, "discriminator forward+backward alone", t_d * 1e3, "ms"),
                 _row(sec, "(guided - unguided) / disc f+b", ratio, "x",
                      BUDGETS["guidance_overhead"], ratio <= BUDGETS["guidance_overhead"])]
    return rows


# ---------------------------------------------------------------------------------------------
# Training: KL objective vs cross-entropy
# ---------------------------------------------------------------------------------------------
def bench_training(device="cpu", *, train_batch=256, reps=5, train_inner=5, seed=0,
                   hidden=128, depth=3, **_) -> list:
    """One optimiser step of the KL objective vs one of cross-entropy, same discriminator and batch."""
    import dgref
    from dgref.discriminator import Discriminator, ce_loss, kl_loss

    device = torch.device(device)
    torch.manual_seed(seed)
    data = dgref.ring()
    model = data.reweighted(stds=0.22)
    den = dgref.mlp_denoiser(2, data.std()).to(device).eval()
    for p in den.parameters():
        p.requires_grad_(False)
    gen = torch.Generator(device=device).manual_seed(seed)
    x_real = data.sample(train_batch, generator=torch.Generator().manual_seed(seed)).to(device)
    x_fake = model.sample(train_batch, generator=torch.Generator().manual_seed(seed + 1)
                          ).to(device)
    discs = {k: Discriminator(2, data.std(), hidden, depth).to(device) for k in ("ce", "kl")}
    discs["kl"].load_state_dict(discs["ce"].state_dict())
    opts = {k: torch.optim.Adam(d.parameters(), lr=1e-4) for k, d in discs.items()}

    def ce_step():
        loss = ce_loss(discs["ce"], x_real, x_fake, generator=gen)
        opts["ce"].zero_grad(set_to_none=True)
        loss.backward()
        opts["ce"].step()

    def kl_step():
        loss = kl_loss(discs["kl"], den, x_real, generator=gen)
        opts["kl"].zero_grad(set_to_none=True)
        loss.backward()
        opts["kl"].step()

    t = time_interleaved({"ce": ce_step, "kl": kl_step}, device=device, reps=reps,
                         inner=train_inner, warmup=2)
    ratio = _round_median(t["_samples"], lambda ce, kl: kl / ce, "ce", "kl")
    sec = f"training, disc {depth}x{hidden}"
    note = (f"batch {train_batch} real (+{train_batch} pre-generated fake for CE), "
            "denoiser 3x256 frozen")
    return [_row(sec, "CE training step", t["ce"] * 1e3, "ms", note=note),
            _row(sec, "KL training step", t["kl"] * 1e3, "ms"),
            _row(sec, "KL step / CE step", ratio, "x", BUDGETS["kl_vs_ce_step"],
                 ratio <= BUDGETS["kl_vs_ce_step"])]


# ---------------------------------------------------------------------------------------------
# Likelihood: ODE throughput and the exact KL
# ---------------------------------------------------------------------------------------------
def bench_likelihood(device="cpu", *, kl_points=2000, kl_steps=None, seed=0, **_) -> list:
    """ODE log-likelihood throughput in 2-D and the time of ``kl_divergence`` on 2000 points.

    ``kl_steps=None`` runs the default ODE settings in full; a number runs that many steps and
    scales the time to the default number of steps (each step costs the same).
    """
    import inspect

    import dgref

    device = torch.device(device)
    torch.manual_seed(seed)
    data = dgref.ring()
    den = dgref.mlp_denoiser(2, data.std()).to(device).eval()   # trained size: 3x256 SiLU
    default_steps = inspect.signature(dgref.ode_log_likelihood).parameters["num_steps"].default
    steps = default_steps if kl_steps is None else kl_steps
    gen = torch.Generator().manual_seed(seed)
    x = data.sample(kl_points, generator=gen).to(device)
    dgref.ode_log_likelihood(den, x[:64], num_steps=2)          # warm-up
    clock = default_clock(device)
    _sync(device)
    t0, w0 = clock(), time.perf_counter()
    kl, se = dgref.kl_divergence(data, den, x=x, num_steps=steps)
    _sync(device)
    elapsed, wall = clock() - t0, time.perf_counter() - w0
    scaled = elapsed * default_steps / steps
    sec = "likelihood (2-D, denoiser 3x256)"
    how = ("measured" if steps == default_steps
           else f"measured at {steps} steps, scaled to {default_steps}")
    how += f"; wall clock {wall * default_steps / steps:.1f} s"
    return [_row(sec, "ODE log-likelihood throughput", kl_points / scaled, "points/s",
                 note=f"{default_steps} Heun steps, exact divergence"),
            _row(sec, f"exact KL on {kl_points} points", scaled, "s",
                 BUDGETS["kl_2000_seconds"], scaled <= BUDGETS["kl_2000_seconds"], note=how)]


def bench_ode_accuracy(*, num_points=2000, steps=(16, 32, 64, 128), seed=0,
                       solvers=("heun",)) -> list:
    """Bias of the ODE log-likelihood against the exact log-density, by number of steps.

    Uses the ring's exact denoiser, whose probability-flow ODE density is the ring itself, so
    ``mean(log p - ode_log_likelihood)`` is the discretisation bias a KL estimate inherits.
    """
    import inspect

    import dgref

    data = dgref.ring()
    x = data.sample(num_points, generator=torch.Generator().manual_seed(seed))
    lp = data.log_prob(x.double())
    has_solver = "solver" in inspect.signature(dgref.ode_log_likelihood).parameters
    rows = []
    for solver in solvers:
        if solver != "heun" and not has_solver:
            continue
        for n in steps:
            kw = {"solver": solver} if has_solver else {}
            t0 = time.perf_counter()
            lq = dgref.ode_log_likelihood(data, x, num_steps=n, **kw).double()
            el = time.perf_counter() - t0
            err = lp - lq
            rows.append(_row("ODE accuracy (ring, exact denoiser)",
                             f"{solver}, {n} steps: KL bias", float(err.mean()), "nats",
                             note=f"rms error {float(err.pow(2).mean().sqrt()):.4f}, "
                                  f"{el:.2f} s"))
    return rows


# ---------------------------------------------------------------------------------------------
# Chapters
# ---------------------------------------------------------------------------------------------
def _toc_chapters(root: Path) -> list:
    """Notebook paths listed in ``_toc.yml``, in order."""
    import re
    files = re.findall(r"file:\s*([^\s#]+)", (root / "_toc.yml").read_text())
    out = []
    for f in files:
        p = root / f
        p = p if p.suffix else p.with_suffix(".ipynb")
        if p.suffix == ".ipynb" and p.exists():
            out.append(p)
    return out


def bench_chapters(root=None, *, timeout=900, skip=()) -> list:
    """Execute each chapter of ``_toc.yml`` at its default parameters, one after the other."""
    import nbformat
    from nbclient import NotebookClient

    root = Path(root) if root is not None else Path(__file__).resolve().parents[1]
    share = Path(sys.prefix) / "share" / "jupyter"
    os.environ["JUPYTER_PATH"] = os.pathsep.join(
        [str(share)] + [p for p in os.environ.get("JUPYTER_PATH", "").split(os.pathsep) if p])
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("DGREF_PROGRESS", "0")
    rows, total, total_cpu = [], 0.0, 0.0
    for nb_path in _toc_chapters(root):
        if nb_path.stem in skip:
            continue
        nb = nbformat.read(nb_path, as_version=4)
        client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                                resources={"metadata": {"path": str(nb_path.parent)}})
        t0, c0 = time.perf_counter(), _children_cpu()
        err = ""
        try:
            client.execute()
        except Exception as exc:  # noqa: BLE001 - report and carry on
            err = f"FAILED: {type(exc).__name__}: {str(exc).strip().splitlines()[-1][:120]}"
        el, cpu = time.perf_counter() - t0, _children_cpu() - c0
        total += el
        total_cpu += cpu
        rows.append(_row("chapters (default parameters)", nb_path.stem, el, "s",
                         note=err or f"wall clock; kernel CPU time {cpu:.0f} s"))
    rows.append(_row("chapters (default parameters)", "whole book", total, "s",
                     BUDGETS["book_seconds"], total <= BUDGETS["book_seconds"],
                     note=f"{len(rows)} chapters, sequential, wall clock; kernels' CPU time "
                          f"{total_cpu:.0f} s"))
    return rows


def _children_cpu() -> float:
    """CPU seconds of this process's finished children (the notebook kernels)."""
    import resource
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


# ---------------------------------------------------------------------------------------------
# Driver and tables
# ---------------------------------------------------------------------------------------------
def run_benchmarks(*, device="cpu", small=False, chapters=False, ode_accuracy=False,
                   threads=1, only=None, log=print) -> dict:
    """Run the suite on one device; returns ``{"machine", "settings", "rows"}``."""
    if threads:
        torch.set_num_threads(int(threads))
    device = torch.device(device)
    setting = "small" if small else ("cuda" if device.type == "cuda" else "cpu")
    sizes = dict(SIZES[setting])
    rows = []
    parts = [("guidance", bench_guidance), ("training", bench_training),
             ("likelihood", bench_likelihood)]
    for name, fn in parts:
        if only and name not in only:
            continue
        t0 = time.perf_counter()
        try:
            rows += fn(device, **sizes)
        except ImportError as exc:
            rows.append(_row(name, "skipped", float("nan"), "", note=f"ImportError: {exc}"))
        log(f"[bench] {name} on {device}: {time.perf_counter() - t0:.1f} s")
    if ode_accuracy and (not only or "ode_accuracy" in only):
        rows += bench_ode_accuracy(solvers=("heun", "rk4"))
    if chapters and device.type == "cpu" and (not only or "chapters" in only):
        t0 = time.perf_counter()
        rows += bench_chapters()
        log(f"[bench] chapters: {time.perf_counter() - t0:.1f} s")
    clock = "wall" if default_clock(device) is time.perf_counter else "process CPU time"
    return {"machine": machine_info(device),
            "settings": {"setting": setting, "clock": clock, **sizes}, "rows": rows}


def _fmt(v) -> str:
    if isinstance(v, float) and math.isnan(v):
        return "n/a"
    if isinstance(v, float):
        a = abs(v)
        if a >= 1000:
            return f"{v:,.0f}"
        if a >= 100:
            return f"{v:.0f}"
        if a >= 10:
            return f"{v:.1f}"
        if a >= 1:
            return f"{v:.2f}"
        return f"{v:.3g}"
    return str(v)


def _status(row) -> str:
    if row["ok"] is None:
        return ""
    return "met" if row["ok"] else "MISSED"


def machine_line(machine: dict) -> str:
    s = (f"{machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}, "
         f"{machine['threads']} thread(s), device {machine['device']}")
    if "gpu" in machine:
        s += f" ({machine['gpu']})"
    if "load_average" in machine:
        s += f", load average {machine['load_average'][0]}"
    return s


def format_table(results: dict) -> str:
    """A plain-text table for the terminal."""
    rows = results["rows"]
    lines = [f"Machine: {machine_line(results['machine'])}",
             f"Setting: {results['settings']['setting']}"]
    w = max([len(f"{r['section']}: {r['name']}") for r in rows] + [20])
    for r in rows:
        b = "" if r["budget"] is None else f"<= {_fmt(float(r['budget']))}"
        lines.append(f"{(r['section'] + ': ' + r['name']).ljust(w)}  "
                     f"{_fmt(r['value']):>10} {r['unit']:<9} {b:<9} {_status(r):<6} {r['note']}")
    return "\n".join(lines)


def format_markdown(results: dict, title: str = "dgref benchmarks") -> str:
    """A markdown table naming the machine."""
    out = [f"# {title}", "", f"Machine: {machine_line(results['machine'])}.  ",
           f"Setting: `{results['settings']['setting']}` "
           f"({', '.join(f'{k}={v}' for k, v in results['settings'].items() if k != 'setting')}).",
           "", "| section | measurement | value | unit | budget | status | note |",
           "|---|---|---:|---|---|---|---|"]
    for r in results["rows"]:
        b = "" if r["budget"] is None else f"<= {_fmt(float(r['budget']))}"
        out.append(f"| {r['section']} | {r['name']} | {_fmt(r['value'])} | {r['unit']} | {b} "
                   f"| {_status(r)} | {r['note']} |")
    return "\n".join(out) + "\n"


def save_json(results: dict, path) -> None:
    clean = {k: v for k, v in results.items()}
    Path(path).write_text(json.dumps(clean, indent=1, default=str))
