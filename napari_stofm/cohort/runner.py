"""Many slices, one call: :func:`embed_many` / :func:`predict_many` (``stofm embed|predict A B ... -o OUTDIR``).

Where the slices run (``client=`` / ``--scheduler``):

* ``None``: one after another in this process;
* ``'local'`` or ``'local:N'``: a :class:`dask.distributed.LocalCluster` of N worker
  processes started here (and closed at the end);
* ``'tcp://HOST:PORT'`` (any dask address), or the path of a dask scheduler file: an
  existing cluster; or a :class:`distributed.Client` already connected.

Each slice is one task; a failed slice is reported by name with its error and the others
finish (:class:`CohortReport`). On a cluster the workers read the slices and write the
outputs themselves, so the paths must mean the same on every node (a shared file system).
Outputs are ``OUTDIR/<slice name>.h5ad``, written whole (temporary file, then
``os.replace``) with the run's key in ``uns['stofm']['cohort']``: a rerun skips every output
that is complete for the same weights, settings and input.

**The model travels once per worker.** It is :meth:`~distributed.Client.scatter`-ed with
``broadcast=True``: one copy is pickled to every worker and held there for the whole run,
and each task gets that copy (a worker that joins or restarts later fetches it from a peer).
We chose this over loading the checkpoint on each worker because it works for every model
(the bundled weights, a published checkpoint, or one trained or adapted in this process and
never saved) and needs no checkpoint folder at the same path on every node; the cost is one
transfer of the weights (15 MB for the bundled ones) per worker. A reference slice (label
transfer) is embedded once, by one worker, and fetched once by each of the others.

**Threads.** dask starts workers with one BLAS / OpenMP thread; each task sets torch's
threads (and those pools) to the CPUs of its machine divided by the worker threads the
cluster runs there, so N workers never oversubscribe the cores.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence

from napari_stofm import keys
from napari_stofm.cohort import tasks as T
from napari_stofm.errors import StofmInputError

log = logging.getLogger(__name__)

#: attempts a slice gets after its task raised (a worker that dies is handled by dask itself)
RETRIES = 2
INSTALL_HINT = "pip install 'napari-stofm[cluster]'"
WAIT_FOR_WORKERS = 120.0  # seconds an existing cluster gets to have a worker
SUMMARY_NAME = "cohort_summary.csv"


# ----------------------------------------------------------------------------- report


@dataclass
class CohortReport:
    """What a cohort run did, slice by slice (in the order the slices were given)."""

    results: List[T.SliceResult]
    seconds: float = 0.0
    out_dir: Optional[Path] = None
    summary_path: Optional[Path] = None
    summary: object = None  # pandas DataFrame: slice, labelling, class, n_cells, share (predict only)
    where: str = "this process"

    @property
    def written(self) -> List[T.SliceResult]:
        return [r for r in self.results if r.status == T.WRITTEN]

    @property
    def skipped(self) -> List[T.SliceResult]:
        return [r for r in self.results if r.status == T.SKIPPED]

    @property
    def failed(self) -> List[T.SliceResult]:
        return [r for r in self.results if r.status == T.FAILED]

    @property
    def ok(self) -> bool:
        return not self.failed

    def __getitem__(self, name: str) -> T.SliceResult:
        for r in self.results:
            if r.name == name:
                return r
        raise KeyError(name)

    def describe(self) -> str:
        cells = sum(r.n_cells for r in self.written)
        rate = f", {cells / self.seconds:.0f} cells/s" if self.seconds > 0 and cells else ""
        lines = [f"{len(self.results)} slices in {self.seconds:.1f} s on {self.where}: {len(self.written)} written "
                 f"({cells} cells{rate}), {len(self.skipped)} already complete, {len(self.failed)} failed"]
        lines += [f"  FAILED {r.name}: {r.error}" for r in self.failed]
        return "\n".join(lines)

    __str__ = describe


# ----------------------------------------------------------------------------- where slices run


def _require_dask():
    try:
        import distributed
    except ImportError:
        raise StofmInputError(f"running slices on a dask cluster needs dask.distributed, which is not installed: "
                              f"{INSTALL_HINT} (or run without --scheduler, one slice after another)") from None
    return distributed


def parse_scheduler(text: str):
    """``('local', N or None)``, ``('address', ADDRESS)`` or ``('file', PATH)`` from a ``--scheduler`` value."""
    value = str(text).strip()
    if value == "local" or value.startswith("local:") or value.startswith("local["):
        count = value[len("local"):].strip(":[]")
        if not count:
            return "local", None
        try:
            n = int(count)
        except ValueError:
            n = 0
        if n < 1:
            raise StofmInputError(f"--scheduler {value}: the number of local workers must be a positive integer "
                                  "(e.g. local:4)")
        return "local", n
    if "://" in value:
        return "address", value
    path = Path(value).expanduser()
    if path.is_file():
        return "file", str(path)
    if value.count(":") == 1 and value.rsplit(":", 1)[1].isdigit():
        return "address", f"tcp://{value}"
    raise StofmInputError(f"--scheduler {value!r} is not a scheduler: use local, local:N (N worker processes here), "
                          "tcp://HOST:PORT (a running dask scheduler) or the path of a dask scheduler file")


def default_local_workers(n_slices: int) -> int:
    """``--scheduler local``: one worker per CPU core, at most one per slice.

    Slices in separate processes need no synchronisation, while torch's threads within one
    process do: ``benchmarks/bench_cohort.py`` measured 2 single-threaded workers 2.4 times
    faster than 1 worker with 2 threads on a shared 2-core machine."""
    from dask.system import CPU_COUNT

    return max(1, min(n_slices, CPU_COUNT))


class InProcess:
    """Slices one after another in this process."""

    where = "this process"

    def put(self, obj):
        return obj

    def map(self, fn: Callable, items: Sequence, *args) -> Iterable:
        for item in items:
            try:
                yield item, fn(item, *args)
            except Exception as err:  # noqa: BLE001 - reported as that slice's failure; the others go on
                log.debug("slice %s failed", getattr(item, "name", item), exc_info=True)
                yield item, err

    def submit(self, fn: Callable, *args):
        return fn(*args)

    def close(self) -> None:
        pass


class OnDask:
    """Slices as tasks of a dask cluster (one task per slice, :data:`RETRIES` retries)."""

    #: checks (fingerprints, outputs already there) run in this process: a local cluster sees the same files
    checks_here = False

    def __init__(self, client=None, cluster=None, where: str = "", owned: bool = False, start=None):
        self._client = client
        self.cluster = cluster  # closed with the runner when we started it
        self._start = start  # () -> (client, cluster): a cluster started on first use
        self.owned = owned or cluster is not None or start is not None  # ours to close (never the caller's)
        self.where = where or f"the dask cluster at {client.scheduler.address}"
        self._n = 0

    @property
    def client(self):
        if self._client is None:
            self._client, self.cluster = self._start()
        return self._client

    @classmethod
    def connect(cls, spec, n_slices: int) -> "OnDask":
        distributed = _require_dask()
        if isinstance(spec, distributed.Client):
            return cls(spec)._with_workers()
        kind, value = parse_scheduler(spec)
        if kind == "local":
            n = value or default_local_workers(n_slices)

            def start():
                cluster = distributed.LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                                                   dashboard_address=None, silence_logs=logging.ERROR)
                return distributed.Client(cluster), cluster

            runner = cls(where=f"{n} local worker process{'es' if n > 1 else ''}", start=start)
            runner.checks_here = True  # and a rerun with nothing left to do starts no cluster
            return runner
        try:
            client = (distributed.Client(scheduler_file=value, timeout="30s") if kind == "file"
                      else distributed.Client(value, timeout="30s"))
        except (OSError, TimeoutError) as err:
            raise StofmInputError(f"could not reach the dask scheduler {value} ({err}): check the address (or the "
                                  "scheduler file) and that the scheduler is running") from None
        return cls(client, owned=True)._with_workers()

    def _with_workers(self, timeout: float = WAIT_FOR_WORKERS) -> "OnDask":
        """Wait (up to ``timeout`` seconds) for the cluster to have a worker."""
        if not self.client.scheduler_info().get("workers"):
            log.info("waiting for a worker of %s", self.where)
            try:
                self.client.wait_for_workers(1, timeout=timeout)
            except TimeoutError:
                raise StofmInputError(f"{self.where} has no worker (none joined in {timeout:.0f} s): start some, "
                                      f"e.g. `dask worker {self.client.scheduler.address}` on each node") from None
        return self

    def _threads(self) -> Dict[str, int]:
        """Worker threads per host: each task divides its machine's CPUs by this."""
        per_host: Dict[str, int] = {}
        for info in self.client.scheduler_info().get("workers", {}).values():
            host = str(info.get("host", ""))
            per_host[host] = per_host.get(host, 0) + int(info.get("nthreads", 1) or 1)
        return per_host

    def put(self, obj):
        if obj is None:
            return None
        return self.client.scatter(obj, broadcast=True, hash=False)

    def _submit(self, fn, *args, name: str = "task", retries: int = RETRIES):
        self._n += 1
        return self.client.submit(_on_worker, fn, self._threads_now, *args, key=f"stofm-{name}-{self._n}-{id(self)}",
                                  retries=retries, pure=False)

    def map(self, fn: Callable, items: Sequence, *args) -> Iterable:
        distributed = _require_dask()
        self._threads_now = self._threads()
        futures = {self._submit(fn, item, *args, name=f"{fn.__name__}-{getattr(item, 'name', '')}"): item
                   for item in items}
        try:
            for future in distributed.as_completed(futures):
                item = futures.pop(future)
                try:
                    yield item, future.result()
                except Exception as err:  # noqa: BLE001 - the slice failed after its retries: reported by name
                    yield item, err
        finally:
            for future in futures:
                future.cancel()

    def submit(self, fn: Callable, *args):
        """One task whose result stays on the cluster (a future); its error is raised here."""
        distributed = _require_dask()
        self._threads_now = self._threads()
        future = self._submit(fn, *args, name=fn.__name__, retries=0)
        distributed.wait(future)
        if future.status == "error":
            future.result()  # raises the task's error
        return future

    def close(self) -> None:
        if self.owned and self._client is not None:
            self._client.close()
        if self.cluster is not None:
            self.cluster.close()


def _on_worker(fn, threads_per_host: Dict[str, int], *args):
    """Run ``fn(*args)`` on a dask worker with torch's threads set for this machine."""
    _set_torch_threads(threads_per_host)
    return fn(*args)


def _set_torch_threads(threads_per_host: Dict[str, int]) -> None:
    """torch's threads (and numpy's BLAS / OpenMP pools, which dask starts at one thread) =
    this machine's CPUs / the worker threads the cluster runs on it."""
    import torch
    from dask.system import CPU_COUNT
    from distributed import get_worker
    from distributed.comm import get_address_host

    worker = get_worker()
    busy = threads_per_host.get(get_address_host(worker.address))
    if not busy:  # a worker that joined after the run started: its own threads only
        busy = int(getattr(worker.state, "nthreads", 1) or 1)
    n = max(1, CPU_COUNT // busy)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:  # pragma: no cover - comes with scikit-learn
            return
        threadpool_limits(n)


def runner_for(client, n_slices: int):
    return InProcess() if client is None else OnDask.connect(client, n_slices)


# ----------------------------------------------------------------------------- the run


def _load(model):
    from napari_stofm.model.stofm import load_model

    if model is None or isinstance(model, (str, os.PathLike)):
        return load_model(model)
    return model


def slice_plan(paths: Sequence, out_dir) -> List[tuple]:
    """``(name, input, output)`` per slice; two slices with one name are an error."""
    from napari_stofm.io.slices import slice_name

    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = [os.fspath(p) for p in paths]
    if not paths:
        raise StofmInputError("no slices given: pass one or more .h5ad files or SpatialData .zarr folders")
    out = T.check_output_folder(out_dir)
    seen: Dict[str, str] = {}
    plan = []
    for p in paths:
        name = slice_name(p)
        if name in seen:
            raise StofmInputError(f"{seen[name]} and {p} are both called {name!r}, and OUTDIR/{name}.h5ad can hold "
                                  "only one: rename one of them, or run them into different folders")
        seen[name] = p
        plan.append((name, p, str(out / f"{name}.h5ad")))
    return plan


class _Progress:
    """``[done/total] slice: cells, seconds, cells/s`` per finished slice, to ``progress(done, total, message)``.

    ``what``: the step the count is about (joint regions count the embedding and the
    labelling of the slices separately)."""

    def __init__(self, progress, total: int, what: str = ""):
        self.progress = progress
        self.total = total
        self.what = what
        self.done = 0
        self.cells = 0
        self.t0 = time.perf_counter()

    def __call__(self, result: T.SliceResult) -> None:
        self.done += 1
        if result.status == T.WRITTEN:
            self.cells += result.n_cells
            elapsed = time.perf_counter() - self.t0
            message = (f"{result.name}: {result.n_cells} cells {self.what}in {result.seconds:.1f} s "
                       f"({result.cells_per_second:.0f} cells/s); {self.cells / max(elapsed, 1e-9):.0f} cells/s "
                       "overall")
        elif result.status in (T.SKIPPED, T.COMPLETE):
            message = f"{result.name}: already complete, kept"
        else:
            message = f"{result.name}: FAILED: {result.error}"
        self.say(message)

    def say(self, message: str) -> None:
        if self.progress is not None:
            self.progress(self.done, self.total, message)


def _result_of(item: T.SliceTask, value) -> T.SliceResult:
    if isinstance(value, T.SliceResult):
        return value
    err = value if isinstance(value, BaseException) else RuntimeError(str(value))
    text = str(err) or type(err).__name__
    if type(err).__name__ == "KilledWorker":
        text = f"the worker processes running it kept dying (out of memory?): {text}"
    elif not isinstance(err, StofmInputError):
        text = f"{type(err).__name__}: {text}"
    return T.SliceResult(item.name, item.input, item.output, status=T.FAILED, error=text)


def _check(runner, task_list: List[T.SliceTask]) -> Dict[str, T.SliceResult]:
    where = InProcess() if getattr(runner, "checks_here", True) else runner
    return {item.name: _result_of(item, value) for item, value in where.map(T.check_slice, task_list)}


def embed_many(paths, model=None, *, out_dir, client=None, overwrite: bool = False,
               progress: Optional[Callable] = None, **embed_kwargs) -> CohortReport:
    """Embed every slice of ``paths`` into ``out_dir/<slice name>.h5ad`` (what ``stofm embed`` writes).

    Parameters
    ----------
    paths
        Slice files (``.h5ad``, SpatialData ``.zarr``).
    model
        A loaded :class:`~napari_stofm.model.stofm.SToFM`, a checkpoint folder, or None
        (the bundled weights).
    out_dir
        The output folder (created when missing; its parent must exist).
    client
        Where the slices run: None (this process, one after another), ``'local'`` /
        ``'local:N'``, a scheduler address or file, or a ``distributed.Client`` (see the
        module's docstring).
    overwrite
        Replace outputs made with other weights, settings or input (outputs complete for
        this run are always kept).
    progress
        ``progress(done, total, message)`` after each slice.
    embed_kwargs
        Those of :func:`~napari_stofm.pipeline.embed.embed` (``split_num``, ``seed``,
        ``values``, ``device``, ...), the same for every slice.

    Returns a :class:`CohortReport`; a failed slice does not raise (see ``report.failed``).

    A script that starts local workers (``client='local:N'``) must call this under
    ``if __name__ == "__main__":``: the worker processes import the script again (as with
    any Python multiprocessing).
    """
    return _run(paths, model, T.EMBED, out_dir=out_dir, client=client, overwrite=overwrite, progress=progress,
                settings=dict(embed_kwargs))


def predict_many(paths, model=None, *, out_dir, client=None, n_regions: Optional[int] = None,
                 resolution: Optional[float] = None, joint_regions: Optional[int] = None, reference=None,
                 label_key: Optional[str] = None, target_key: str = keys.CELL_TYPE, seed: int = 0,
                 joint_sample: Optional[int] = None, overwrite: bool = False, progress: Optional[Callable] = None,
                 **embed_kwargs) -> CohortReport:
    """Predict regions and/or cell types for every slice of ``paths`` (what ``stofm predict`` writes).

    ``n_regions`` / ``resolution``: regions found on each slice on its own (as ``stofm
    predict``; their numbers mean nothing across slices). ``joint_regions=K`` instead: one
    vocabulary of K regions fitted on the cells of all slices together
    (:mod:`napari_stofm.cohort.joint`; on a sample of ``joint_sample`` cells, 50,000 by
    default) and every slice labelled with it. ``reference`` + ``label_key``: labels learned
    from one labelled slice (a path or an AnnData), embedded once, and transferred to every
    slice; ``label_key`` alone completes each slice's own partial labels.

    Writes ``out_dir/cohort_summary.csv`` (cells per class per slice) beside the outputs.
    Other parameters: see :func:`embed_many`. Returns a :class:`CohortReport`.
    """
    from napari_stofm.cohort import joint as J

    if joint_regions is not None and (n_regions is not None or resolution is not None):
        raise StofmInputError("give joint_regions (one set of regions for all slices) or n_regions / resolution "
                              "(regions per slice), not both")
    if joint_regions is not None and label_key is not None and target_key == keys.REGION:
        raise StofmInputError("joint regions and labels learned into obs['stofm_region'] would write the same "
                              "column: learn the labels into stofm_cell_type, or leave out the joint regions")
    if label_key is None and reference is not None:
        raise StofmInputError("a reference slice needs label_key= (the obs column holding its labels)")
    settings = dict(embed_kwargs, n_regions=n_regions, resolution=resolution, label_key=label_key,
                    target_key=target_key, seed=seed)
    joint = None
    if joint_regions is not None:
        joint = dict(n_regions=joint_regions, seed=seed)
        if joint_sample is not None:
            joint["sample"] = joint_sample
        J.joint_settings(**joint, n_slices=1)  # checked before anything runs
    return _run(paths, model, T.PREDICT, out_dir=out_dir, client=client, overwrite=overwrite, progress=progress,
                settings=settings, reference=reference, joint=joint)


def _run(paths, model, kind: str, *, out_dir, client, overwrite: bool, progress, settings: dict,
         reference=None, joint: Optional[dict] = None) -> CohortReport:
    t0 = time.perf_counter()
    plan = slice_plan(paths, out_dir)
    settings = {k: v for k, v in settings.items() if v is not None}  # None is every keyword's default
    model = _load(model)
    ref_path, ref_fp = None, None
    if reference is not None:
        ref_path, ref_fp = _reference_identity(reference, settings)
    joint_settings = None
    if joint is not None:
        from napari_stofm.cohort.joint import joint_settings as make_joint

        joint_settings = make_joint(**joint, n_slices=len(plan))
    task_list = [T.SliceTask(name, inp, out, kind, model.fingerprint, settings, overwrite=overwrite,
                             reference=ref_path, reference_fingerprint=ref_fp, joint=joint_settings)
                 for name, inp, out in plan]
    runner = runner_for(client, len(plan))
    try:
        results = _run_on(runner, task_list, model, reference, progress)
    finally:
        runner.close()
    report = CohortReport([results[t.name] for t in task_list], seconds=time.perf_counter() - t0,
                          out_dir=Path(out_dir).expanduser(), where=runner.where)
    if kind == T.PREDICT:
        _write_summary(report)
    return report


def _run_on(runner, task_list: List[T.SliceTask], model, reference, progress) -> Dict[str, T.SliceResult]:
    tick = _Progress(progress, len(task_list))
    checked = _check(runner, task_list)
    results: Dict[str, T.SliceResult] = {}
    todo = []
    for task in task_list:
        found = checked[task.name]
        if found.status == T.FAILED:
            results[task.name] = found
            tick(found)
        elif found.status == T.COMPLETE and task.joint is None:
            found.status = T.SKIPPED
            results[task.name] = found
            tick(found)
        else:
            todo.append(replace(task, key=found.key))
    if todo and todo[0].joint is not None and _joint_complete(todo, checked):
        for task in todo:
            results[task.name] = r = checked[task.name]
            r.status = T.SKIPPED
            tick(r)
        return results
    if not todo:
        return results
    model_handle, ref_handle = None, None
    if any(checked[t.name].status != T.COMPLETE for t in todo):  # the model (and reference) are needed
        model_handle = runner.put(model)
        if reference is not None:
            ref_handle = runner.submit(prepare_reference, reference, todo[0].settings, model_handle)
            tick.say(f"reference {todo[0].reference}: embedded, once for every slice")
    if todo[0].joint is None:
        for task, value in runner.map(T.run_slice, todo, model_handle, ref_handle):
            results[task.name] = r = _result_of(task, value)
            tick(r)
        return results
    return _run_joint(runner, todo, checked, results, model_handle, ref_handle, tick)


def _joint_complete(todo: List[T.SliceTask], checked: Dict[str, T.SliceResult]) -> bool:
    """Every slice's output is complete for this very cohort and these joint settings."""
    keys_ = [t.key for t in todo]
    return all(checked[t.name].status == T.COMPLETE
               and checked[t.name].stored_joint_key == T.joint_key(t.key, t.joint, keys_) for t in todo)


def _run_joint(runner, todo, checked, results, model_handle, ref_handle, tick) -> Dict[str, T.SliceResult]:
    """Joint regions in three steps: embed each slice, fit one region model, label each slice."""
    from napari_stofm.cohort.joint import JointRegions

    # 1. embed (and learn cell types for) the slices not done yet; the others give their sample from their output
    tick.what = "embedded "
    stage1: Dict[str, T.SliceResult] = {}
    embedded = [t for t in todo if checked[t.name].status != T.COMPLETE]
    sampled = [t for t in todo if checked[t.name].status == T.COMPLETE]
    for fn, part, args in ((T.run_slice, embedded, (model_handle, ref_handle)), (T.sample_slice, sampled, ())):
        for task, value in runner.map(fn, part, *args):
            stage1[task.name] = r = _result_of(task, value)
            if r.status == T.SKIPPED:  # embedded by an earlier run
                tick.done += 1
                tick.say(f"{task.name}: embedded already, its cells join the joint regions")
            else:
                tick(r)
            if not r.ok:
                results[task.name] = r
    cohort = sorted((t for t in todo if stage1[t.name].ok), key=lambda t: t.key)  # the fit never depends on order
    if not cohort:
        return results
    cohort_keys = [t.key for t in cohort]
    cohort = [replace(t, joint_key=T.joint_key(t.key, t.joint, cohort_keys)) for t in cohort]
    relabel = [t for t in cohort if stage1[t.name].status == T.WRITTEN
               or checked[t.name].stored_joint_key != t.joint_key]
    for task in cohort:
        if task not in relabel:  # complete already, for this very cohort
            r = stage1[task.name]
            r.status, r.sample = T.SKIPPED, None
            results[task.name] = r
    if not relabel:
        return results
    # 2. one region model for the whole cohort, from every slice's sample (complete ones included)
    try:
        regions = JointRegions([stage1[t.name].sample for t in cohort], cohort[0].joint)
    except StofmInputError as err:
        for task in relabel:
            results[task.name] = T.SliceResult(task.name, task.input, task.output, status=T.FAILED,
                                               error=f"joint regions: {err}")
            tick.say(f"{task.name}: FAILED: joint regions: {err}")
        return results
    for task in cohort:
        stage1[task.name].sample = None
    tick.say(f"joint regions: {regions.n_found} regions fitted on {regions.n_sample} cells of {len(cohort)} slices")
    # 3. every slice labelled with the joint regions
    label_tick = _Progress(tick.progress, len(relabel), "labelled with the joint regions ")
    for task, value in runner.map(T.label_joint, [t for t in cohort if t in relabel], runner.put(regions)):
        r = _result_of(task, value)
        label_tick(r)
        if r.ok and stage1[task.name].status == T.WRITTEN:
            r.seconds += stage1[task.name].seconds  # the slice's whole time: embedding and labelling
        results[task.name] = r
    return results


# ----------------------------------------------------------------------------- reference


def _reference_identity(reference, settings: dict):
    """How outputs name the reference, and its fingerprint (part of every slice's key)."""
    if isinstance(reference, (str, os.PathLike)):
        path = Path(reference).expanduser()
        if not path.exists():
            raise StofmInputError(f"the reference {path} does not exist: check the path")
        return os.fspath(reference), T.input_fingerprint(path)
    return (f"AnnData ({getattr(reference, 'n_obs', '?')} cells)",
            T.adata_fingerprint(reference, settings.get("label_key"), settings.get("spatial_key") or keys.SPATIAL))


def prepare_reference(reference, settings: dict, model):
    """The reference slice, read and embedded once for the whole cohort (as each slice's
    :func:`~napari_stofm.pipeline.predict.run_annotations` would embed it)."""
    from napari_stofm.io.slices import read_slice
    from napari_stofm.pipeline.embed import compute_embedding
    from napari_stofm.pipeline.predict import _labels_of

    spatial_key = settings.get("spatial_key") or keys.SPATIAL
    ref = read_slice(reference, spatial_key=spatial_key) if isinstance(reference, (str, os.PathLike)) \
        else reference.copy()
    _labels_of(ref, settings["label_key"], "the reference slice")
    embed_args = {k: v for k, v in settings.items()
                  if k not in ("n_regions", "resolution", "label_key", "target_key", "region_key", "regions")}
    compute_embedding(ref, model, **embed_args).write(ref)
    return ref


# ----------------------------------------------------------------------------- summary


def summary_table(results: Sequence[T.SliceResult]):
    """Cells per class per slice: one row per (slice, labelling, class), with the class's share of the slice."""
    import pandas as pd

    rows = []
    for r in results:
        for labelling, counts in (r.counts or {}).items():
            total = sum(counts.values())
            for name, n in counts.items():
                rows.append({"slice": r.name, "labelling": labelling, "class": name, "n_cells": int(n),
                             "share": (n / total) if total else 0.0})
    return pd.DataFrame(rows, columns=["slice", "labelling", "class", "n_cells", "share"])


def _write_summary(report: CohortReport) -> None:
    from napari_stofm.io.export import write_table_csv

    table = summary_table([r for r in report.results if r.ok])
    report.summary = table
    if report.out_dir is not None and len(table):
        report.summary_path = write_table_csv(table, report.out_dir / SUMMARY_NAME, overwrite=True)


def region_table(summary, labelling: str = keys.REGION):
    """The summary as slices x classes (cells), for one labelling; None when it has none."""
    if summary is None or not len(summary):
        return None
    part = summary[summary["labelling"] == labelling]
    if not len(part):
        return None
    classes = list(dict.fromkeys(part["class"]))
    wide = part.pivot(index="slice", columns="class", values="n_cells").reindex(columns=classes)
    return wide.reindex(list(dict.fromkeys(part["slice"]))).fillna(0).astype(int)


__all__ = ["CohortReport", "embed_many", "predict_many", "parse_scheduler", "summary_table", "region_table"]
