"""Benchmark `mm_research.structure.report` on the reference presets: build on meta + full structure report.

Each measurement runs in a fresh subprocess, after its imports (torch, transformers, mm_research and the
model's own transformers classes), so imports are not timed and RSS growth is the model's alone:

- `build_s`: `zoo.load_model(name)` on the meta device; `report_s`: `structure_report(model)` plus its text and
  JSON renderings; `total_s` = both (target < 1 s).
- `param_storage_bytes`: bytes held by parameter storage (target 0: every parameter on meta).
- `peak_rss_growth_mb`: peak RSS above the post-import baseline, sampled with psutil every ms (target < 200 MB);
  `vmhwm_growth_mb` is the kernel's exact high-water mark (Linux, /proc) as a cross-check.
- For the smallest reference (efficientnet-b3-wikiart27) the same model is also built with real fp32 CPU
  weights, and the ratio real build time / meta build+report time is reported.

Usage: python benchmarks/inspect_bench.py [--out DIR_OR_JSON] [--repeat N]
Writes metrics.json (default runs/benchmarks/inspect/metrics.json). Not a test: nothing fails on a slow machine.
"""
from __future__ import annotations
import argparse, json, os, subprocess, sys, threading, time
from pathlib import Path

REFERENCE = ["qwen2-audio-7b", "llava-1.5-7b", "blip2-opt-2.7b", "efficientnet-b3-wikiart27"]
LIMITS = dict(total_s=1.0, param_storage_bytes=0, peak_rss_growth_mb=200.0)


class PeakRSS:
    "Samples this process's RSS with psutil in a thread; `.peak_growth_mb` is the max above the starting RSS."
    def __init__(self, interval: float = 0.001):
        import psutil
        self.proc, self.interval, self._stop = psutil.Process(), interval, threading.Event()

    def __enter__(self):
        self.base = self.peak = self.proc.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)
        self.peak_growth_mb = (self.peak - self.base) / 2**20


def _vmhwm_kb() -> int | None:
    try:
        status = Path("/proc/self/status").read_text().splitlines()
        return int(next(line for line in status if line.startswith("VmHWM")).split()[1])
    except (OSError, StopIteration): return None


def _reset_vmhwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError: return False


def measure_one(name: str, mode: str) -> dict:
    "Build `name` (meta: + full report; real: fp32 CPU weights) after imports; time, storage and RSS growth."
    import gc
    import torch, transformers
    from mm_research import zoo
    from mm_research.inspect import _sub_configs
    from mm_research.structure.report import structure_report
    from transformers.models.auto.modeling_auto import MODEL_MAPPING
    config = zoo.load_config(name)
    zoo.model_class_for(config)  # imports the model's transformers module (lazy in transformers)
    for sub in _sub_configs(config).values():
        if type(sub) in MODEL_MAPPING: MODEL_MAPPING[type(sub)]  # and the sub-models' modules
    torch.set_num_threads(1)
    gc.collect()
    reset = _reset_vmhwm()
    hwm0 = _vmhwm_kb()
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        model = zoo.load_model(name, meta=(mode == "meta"), device="cpu")
        t1 = time.perf_counter()
        if mode == "meta":
            rep = structure_report(model)
            text, js = rep.text(), rep.to_json()
        t2 = time.perf_counter()
    hwm1 = _vmhwm_kb()
    params = list({id(p): p for p in model.parameters()}.values())
    out = dict(name=name, mode=mode, build_s=t1 - t0, report_s=t2 - t1 if mode == "meta" else None, total_s=t2 - t0,
               param_count=sum(p.numel() for p in params), all_meta=all(p.is_meta for p in params),
               param_storage_bytes=sum(p.untyped_storage().nbytes() for p in params if not p.is_meta),
               peak_rss_growth_mb=rss.peak_growth_mb,
               vmhwm_growth_mb=(hwm1 - hwm0) / 1024 if reset and hwm0 is not None and hwm1 is not None else None,
               torch=torch.__version__, transformers=transformers.__version__)
    if mode == "meta":
        out.update(report_param_storage_bytes=rep.param_storage_bytes, report_total_params=rep.total_params,
                   report_text_lines=len(text.splitlines()), report_json_bytes=len(js), roles=rep.roles)
    return out


def run_child(name: str, mode: str) -> dict:
    "measure_one in a fresh interpreter."
    r = subprocess.run([sys.executable, __file__, "--one", name, "--mode", mode], capture_output=True, text=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"})
    if r.returncode: raise RuntimeError(f"benchmark of {name} ({mode}) failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def best_of(name: str, mode: str, repeat: int) -> dict:
    "The fastest of `repeat` fresh-process runs (with the worst RSS growth seen across them)."
    runs = [run_child(name, mode) for _ in range(repeat)]
    best = min(runs, key=lambda r: r["total_s"])
    best = dict(best, runs_total_s=[r["total_s"] for r in runs],
                peak_rss_growth_mb=max(r["peak_rss_growth_mb"] for r in runs))
    return best


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None,
                    help="folder for metrics.json, or a .json path (default runs/benchmarks/inspect/)")
    ap.add_argument("--repeat", type=int, default=3, help="fresh-process runs per measurement; the fastest is kept")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="meta", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.one:
        print(json.dumps(measure_one(a.one, a.mode)))
        return
    from mm_research.core import environment_record, runs_root, save_metrics
    out = Path(a.out) if a.out else runs_root()/"benchmarks"/"inspect"
    folder, fname = (out.parent, out.name) if out.suffix == ".json" else (out, "metrics.json")
    folder.mkdir(parents=True, exist_ok=True)
    presets = {}
    for name in REFERENCE:
        r = presets[name] = best_of(name, "meta", a.repeat)
        r["pass"] = dict(total_s=r["total_s"] < LIMITS["total_s"], param_storage_bytes=r["param_storage_bytes"] == 0,
                         peak_rss_growth_mb=r["peak_rss_growth_mb"] < LIMITS["peak_rss_growth_mb"])
        hwm = r['vmhwm_growth_mb'] if r['vmhwm_growth_mb'] is None else round(r['vmhwm_growth_mb'], 1)
        print(f"{name:28s} build {r['build_s']*1e3:7.1f} ms  report {r['report_s']*1e3:6.1f} ms  "
              f"total {r['total_s']*1e3:7.1f} ms"
              f"  storage {r['param_storage_bytes']} B  peak RSS +{r['peak_rss_growth_mb']:.1f} MB"
              f"  (VmHWM +{hwm} MB)")
    real = best_of("efficientnet-b3-wikiart27", "real", a.repeat)
    meta = presets["efficientnet-b3-wikiart27"]
    ratio = real["build_s"] / meta["total_s"]
    print(f"efficientnet-b3-wikiart27 with real CPU weights: build {real['build_s']*1e3:.1f} ms, "
          f"{real['param_storage_bytes']:,} B, peak RSS +{real['peak_rss_growth_mb']:.1f} MB; "
          f"real build / (meta build + report) = {ratio:.1f}x")
    metrics = dict(limits=LIMITS, presets=presets, efficientnet_real_weights=real, real_over_meta_ratio=ratio,
                   all_pass=all(all(p["pass"].values()) for p in presets.values()), repeat=a.repeat,
                   environment=environment_record("cpu"))
    save_metrics(metrics, folder, fname)
    print(f"wrote {folder/fname}")


if __name__ == "__main__":
    main()
