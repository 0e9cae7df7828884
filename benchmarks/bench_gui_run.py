"""How long a run through the Run SToFM widget blocks napari's event loop.

Run ``xvfb-run -a python benchmarks/bench_gui_run.py --cells 300000`` (needs a display;
``QT_API=pyside6``). A tiled slice (:func:`bench_display.tiled`: copies of a real slice
from ``../shared/data``, or of the generated sample) is opened in a real napari viewer,
the Run SToFM dock is added, and its Run button is clicked (the code path of a user's
click: bundled weights, the default number of regions, cell types learnt from a column
of partial labels). A 10 ms timer on the event loop records when each of its turns
happens, from the click until the layers of the result are shown (and ``--settle``
seconds more, for the work a result schedules for later turns).

Printed: the longest gap between two turns (target: under 100 ms), the gaps during the
model run and while the result is shown, the 5 longest gaps with the main thread's CPU
time in each and what it was running (its stack, sampled every ``--sample-ms`` from
another thread while a turn is late), and the total time. A gap in which the main thread
used little CPU, or whose samples sit in napari's event loop, was spent waiting: for the
GIL held by a worker thread's C call, or for a CPU taken by other processes (the
main-thread CPU time of each gap, printed too, is the work done on the event loop, which
is what the plugin controls: a benchmark run under ``nice`` on a busy machine has long
gaps with little work in them). ``--stub-model`` replaces the model by random labels made
in 3 s, to time what happens around a run quickly (not a figure of the real run).
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_display import base_slice, peak_rss_gb, tiled  # noqa: E402  (the same tiled slices)


def _short(path: str) -> str:
    path = path.replace("\\", "/")
    if "napari_stofm/" in path:
        return "napari_stofm/" + path.rsplit("napari_stofm/", 1)[1]
    if "site-packages/" in path:
        return path.rsplit("site-packages/", 1)[1]
    return Path(path).name


def describe(frames: list) -> str:
    """What a main-thread sample was doing (frames innermost first): the innermost frames
    of the plugin, and the innermost frame of all."""
    if not frames:
        return "(no Python frame)"
    ours = [f"{f}:{ln} {fn}" for f, ln, fn in frames if f.startswith("napari_stofm/")][:3]
    inner = frames[0]
    inner_s = f"{inner[0]}:{inner[1]} {inner[2]}"
    if not ours:
        outer = next((f"{f}:{ln} {fn}" for f, ln, fn in frames if f.startswith("napari/")), inner_s)
        return f"napari {outer}" + ("" if outer == inner_s else f" (innermost {inner_s})")
    return " < ".join(ours) + ("" if ours[0] == inner_s else f" (innermost {inner_s})")


def _frames(frame) -> list:
    """A thread's stack as (file, line, function), innermost first."""
    return [(_short(f.filename), f.lineno, f.name) for f in traceback.extract_stack(frame)[::-1]]


def describe_worker(stacks: list) -> str:
    """The other threads of a sample that were running the plugin's code (what held the GIL)."""
    busy = [describe(f) for f in stacks if any(fr[0].startswith("napari_stofm/") for fr in f)]
    return "; ".join(busy)


class GapMonitor:
    """Records the event loop's turns (a 10 ms timer: wall time and the main thread's CPU
    time) and, from a sampling thread, the main thread's stack whenever a turn is late."""

    def __init__(self, sample_s: float):
        from qtpy.QtCore import Qt, QTimer

        self.ticks: list = []
        self.cpu: list = []
        self.samples: list = []  # (time, main-thread frames innermost first, other threads' frames)
        self._sample_s = sample_s
        self._main = threading.main_thread().ident
        self._running = False
        self.timer = QTimer()
        self.timer.setTimerType(Qt.TimerType.PreciseTimer)
        self.timer.setInterval(10)
        self.timer.timeout.connect(self.tick)
        self.on_tick = None

    def start(self):
        self._running = True
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        self.timer.start()

    def stop(self):
        self.timer.stop()
        self._running = False
        self._thread.join()

    def tick(self):
        now = time.perf_counter()
        self.ticks.append(now)
        self.cpu.append(time.thread_time())
        if self.on_tick is not None:
            self.on_tick(now)

    def _sample(self):
        while self._running:
            time.sleep(self._sample_s)
            now = time.perf_counter()
            if self.ticks and now - self.ticks[-1] > self._sample_s:
                frames = sys._current_frames()
                mine = threading.get_ident()
                main = frames.pop(self._main, None)
                others = [_frames(f) for ident, f in frames.items() if ident != mine]
                self.samples.append((now, _frames(main) if main is not None else [], others))


def stub_model(seconds: float = 3.0) -> None:
    """Replace the model run by random regions and cell types made in ``seconds`` (to time
    what happens around a run quickly; not a figure of the real run)."""
    import numpy as np

    from napari_stofm.heads.annotation import Annotation
    from napari_stofm.keys import CELL_TYPE, REGION
    from napari_stofm.pipeline import predict
    from napari_stofm.progress import StagedProgress

    def run_annotations(adata, model=None, *, n_regions=None, label_key=None, progress=None, cancel=None, **_):
        steps = 20
        for i in range(steps):
            time.sleep(seconds / steps)
            if isinstance(progress, StagedProgress):
                progress.update("Model (stub)", i + 1, steps)
        x = np.asarray(adata.obsm["spatial"], dtype=float)[:, 0]
        k = n_regions or 7
        regions = ((x - x.min()) / (np.ptp(x) + 1e-9) * 5 * k).astype(np.int32) % k
        rng = np.random.default_rng(0)
        annotations = {REGION: Annotation.from_prediction(REGION, [f"Region {i + 1}" for i in range(k)], regions,
                                                          rng.random(adata.n_obs))}
        if label_key:
            cats = list(adata.obs[label_key].cat.categories)
            codes = np.where(adata.obs[label_key].cat.codes >= 0, adata.obs[label_key].cat.codes,
                             rng.integers(0, len(cats), adata.n_obs)).astype(np.int32)
            annotations[CELL_TYPE] = Annotation.from_prediction(CELL_TYPE, cats, codes, rng.random(adata.n_obs))
        return predict.RunResult(annotations)

    predict.run_annotations = run_annotations


def _keep_none_alive() -> None:
    """Work around a PySide6 reference-count bug on Python < 3.12 (as ``tests/conftest.py``
    does): its event dispatch drops references to ``None`` it never took, and a run of many
    minutes with a 10 ms timer takes the count to zero ("none_dealloc"). ``None`` gets many
    extra references once, which is harmless (it is never freed)."""
    import ctypes

    if sys.version_info < (3, 12) and sys.implementation.name == "cpython":
        ctypes.c_ssize_t.from_address(id(None)).value += 1 << 40


def main() -> None:
    _keep_none_alive()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=300_000)
    parser.add_argument("--settle", type=float, default=2.0, help="seconds measured after the layers are shown")
    parser.add_argument("--sample-ms", type=float, default=20.0, help="main-thread stack sampling while a gap lasts")
    parser.add_argument("--timeout", type=float, default=3600.0)
    parser.add_argument("--stub-model", action="store_true",
                        help="random labels instead of the model (times what happens around a run, quickly)")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="also profile the main thread (cProfile) from the click and print its N costliest calls")
    parser.add_argument("--profile-out", default=None, help="with --profile: also write the profile (pstats) here")
    args = parser.parse_args()

    import numpy as np

    tmp = tempfile.TemporaryDirectory()
    os.environ["XDG_CACHE_HOME"] = str(Path(tmp.name) / "cache")  # no cached embedding: the model runs
    base, name = base_slice()
    adata = tiled(base, args.cells)
    keep = np.random.default_rng(0).random(adata.n_obs) < 0.3
    adata.obs["partial_cell_type"] = adata.obs["cell_type"].where(keep)
    path = Path(tmp.name) / f"tiled_{args.cells}.h5ad"
    adata.write_h5ad(path)
    del adata
    print(f"{args.cells} cells (tiles of {name}); python {sys.version.split()[0]}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)

    import napari
    from qtpy.QtCore import QEventLoop, QTimer
    from qtpy.QtWidgets import QApplication

    from napari_stofm._napari.compat import qt_window
    from napari_stofm._napari.layers import labels_layer_for
    from napari_stofm.keys import CELL_TYPE, REGION

    if args.stub_model:
        stub_model()
        print("the model is stubbed: random labels after 3 s (not a figure of the real run)", flush=True)
    viewer = napari.Viewer(show=True)
    qt_window(viewer).resize(1400, 900)
    app = QApplication.instance()
    t = time.perf_counter()
    viewer.open(str(path), plugin="napari-stofm")
    for _ in range(20):
        app.processEvents()
    print(f"opened in {time.perf_counter() - t:.1f} s", flush=True)
    _, widget = viewer.window.add_plugin_dock_widget("napari-stofm", "Run SToFM")
    widget.source_combo.setCurrentText("labels column of this slice")
    widget.label_key.setCurrentText("partial_cell_type")
    session = widget.session
    for _ in range(20):
        app.processEvents()

    monitor = GapMonitor(args.sample_ms / 1000)
    loop = QEventLoop()
    marks: dict = {}

    def shown() -> bool:
        return all(labels_layer_for(viewer, session, k) is not None for k in (REGION, CELL_TYPE))

    def on_tick(now):
        if "click" not in marks:
            return
        if "result" not in marks and widget.last_result is not None:
            marks["result"] = (now, len(monitor.ticks) - 1)
        if "shown" not in marks and widget.worker is None and not widget.showing and (
                shown() or widget.last_error):
            marks["shown"] = (now, len(monitor.ticks) - 1)
        if "shown" in marks and now - marks["shown"][0] >= args.settle or now - marks["click"][0] > args.timeout:
            loop.quit()

    profiler = None
    if args.profile:
        import cProfile

        profiler = cProfile.Profile()

    def click():
        marks["click"] = (time.perf_counter(), len(monitor.ticks))
        if profiler is not None:
            profiler.enable()
        widget.run_button.click()

    monitor.on_tick = on_tick
    monitor.start()
    QTimer.singleShot(200, click)
    loop.exec()
    monitor.stop()
    if profiler is not None:
        import pstats

        profiler.disable()
        if args.profile_out:
            profiler.dump_stats(args.profile_out)
        print(f"the main thread's {args.profile} costliest calls from the click (cProfile, cumulative):")
        pstats.Stats(profiler, stream=sys.stdout).sort_stats("cumulative").print_stats(args.profile)
    if widget.last_error:
        print(f"the run failed: {widget.last_error}")

    ticks = np.asarray(monitor.ticks)
    start = marks["click"][1]
    gaps = np.diff(ticks)  # gaps[i]: between tick i and tick i + 1
    cpu_gaps = np.diff(np.asarray(monitor.cpu))  # the main thread's CPU time in each gap
    in_gap = collections.defaultdict(list)
    workers_in_gap = collections.defaultdict(list)
    for when, frames, others in monitor.samples:
        i = int(np.searchsorted(ticks, when)) - 1
        if 0 <= i < gaps.size:
            in_gap[i].append(frames)
            workers_in_gap[i].append(describe_worker(others))

    def longest(values, a, b):
        sel = values[a:b]
        return float(sel.max()) * 1000 if sel.size else 0.0

    t_click = marks["click"][0]
    result_tick = marks.get("result", (None, len(ticks) - 1))[1]
    shown_tick = marks.get("shown", (None, len(ticks) - 1))[1]
    phases = {"run": (start, result_tick - 1), "show": (result_tick - 1, shown_tick), "after": (shown_tick, len(gaps))}
    t_result = marks["result"][0] - t_click if "result" in marks else float("nan")
    t_shown = marks["shown"][0] - t_click if "shown" in marks else float("nan")
    print(f"longest gap between event-loop turns, click -> layers shown + {args.settle:g} s: "
          f"{longest(gaps, start, len(gaps)):.0f} ms (target < 100 ms); the longest main-thread work in one gap "
          f"(its CPU time): {longest(cpu_gaps, start, len(gaps)):.0f} ms")
    print(f"  during the model run (click -> result, {t_result:.1f} s): gap {longest(gaps, *phases['run']):.0f} ms, "
          f"work {longest(cpu_gaps, *phases['run']):.0f} ms; showing the result ({t_shown - t_result:.2f} s): "
          f"gap {longest(gaps, *phases['show']):.0f} ms, work {longest(cpu_gaps, *phases['show']):.0f} ms; "
          f"afterwards: gap {longest(gaps, *phases['after']):.0f} ms, "
          f"work {longest(cpu_gaps, *phases['after']):.0f} ms")
    print(f"  gaps over 100 ms: {int((gaps[start:] > 0.1).sum())}, over 50 ms: {int((gaps[start:] > 0.05).sum())}; "
          f"main-thread work over 100 ms in one gap: {int((cpu_gaps[start:] > 0.1).sum())}")

    def show(order, title):
        print(title)
        for i in order[:5] + start:
            when = ticks[i] - t_click
            phase = next(name for name, (a, b) in phases.items() if a <= i < b or name == "after")
            stacks = collections.Counter(describe(f) for f in in_gap.get(i, []))
            what = "; ".join(f"{n}x {s}" for s, n in stacks.most_common(3)) or "(no sample)"
            workers = collections.Counter(w for w in workers_in_gap.get(i, []) if w)
            print(f"  {gaps[i] * 1000:7.0f} ms at {when:7.2f} s [{phase}], main thread on CPU "
                  f"{cpu_gaps[i] * 1000:.0f} ms: {what}")
            if workers:
                print("      worker threads in the plugin meanwhile: "
                      + "; ".join(f"{n}x {s}" for s, n in workers.most_common(2)))

    show(np.argsort(gaps[start:], kind="stable")[::-1],
         "top 5 gaps (when after the click; what the main thread was running, most frequent sample first):")
    show(np.argsort(cpu_gaps[start:], kind="stable")[::-1], "top 5 by main-thread work (CPU time in the gap):")
    print(f"total: click -> result {t_result:.1f} s, click -> layers shown {t_shown:.1f} s; "
          f"peak RSS {peak_rss_gb():.2f} GB", flush=True)
    viewer.close()
    tmp.cleanup()


if __name__ == "__main__":
    main()
