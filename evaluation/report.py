"""Reporting an evaluation: per-target JSON and CSV files, the summary table, the result group, TensorBoard.

The scoring itself is in `evaluation.evaluate`; nothing here changes a number.
"""
import csv
import io
import json
import os
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from evaluation.evaluate import EvalResult
from evaluation.groups import EVAL_DIR, group_name, settings_hash, write_group
from evaluation.map_figures import map_figures
from evaluation.plots import result_figures
from utils.atomic_files import atomic_write_text
from utils.distributed import is_main_process
from utils.logger import TensorBoardWriter


def say(line: str) -> None:
    """Print a line on the main process only (every process reaches the same conclusions)."""
    if is_main_process():
        print(line, flush=True)


def write_eval_outputs(result: EvalResult, eval_dir: str, settings_record: Dict[str, Any],
                       group: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """Write `<dataset>_<target>.json` and `<dataset>_<target>_scores.csv` into `eval_dir`.

    `group` (name and settings hash of the result group the files belong to) is recorded in the JSON.
    """
    os.makedirs(eval_dir, exist_ok=True)
    stem = f"{result.dataset}_{result.target}_{result.scorer}"
    record = {"dataset": result.dataset, "target": result.target, "scorer": result.scorer,
              **result.metrics, "known_classes": result.known_classes, "n_support": result.n_support,
              "extra_metrics": result.extra_metrics,
              "seconds": {name: round(value, 3) for name, value in result.seconds.items()},
              **({"group": group} if group is not None else {}),
              "settings": settings_record}
    json_path = os.path.join(eval_dir, f"{stem}.json")
    csv_path = os.path.join(eval_dir, f"{stem}_scores.csv")
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["path", "label", "known", "normality", "pred"])
    for i, path in enumerate(result.paths):
        label = int(result.labels[i])
        pred = "" if result.preds is None else int(result.preds[i])
        writer.writerow([path, label, int(label < result.known_classes), f"{result.normality[i]:.8g}", pred])
    atomic_write_text(csv_path, buffer.getvalue())
    atomic_write_text(json_path, json.dumps(record, indent=2) + "\n")
    return {"json": json_path, "csv": csv_path}


def log_to_tensorboard(writer: Any, result: EvalResult, step: int) -> None:
    """Scalars, known/unknown score histograms and a PR curve under `eval/<dataset>_<target>/`."""
    tag = f"eval/{result.dataset}_{result.target}_{result.scorer}"
    for name in ("auroc", "fpr95", "aupr_in", "aupr_out", "closed_set_acc"):
        if result.metrics.get(name) is not None:
            writer.add_scalar(f"{tag}/{name}", result.metrics[name], step)
    is_known = result.labels < result.known_classes
    writer.add_histogram(f"{tag}/normality_known", result.normality[is_known], step)
    writer.add_histogram(f"{tag}/normality_unknown", result.normality[~is_known], step)
    writer.add_pr_curve(f"{tag}/pr_known", is_known.astype(np.int64), result.normality, step)
    writer.flush()


TABLE_METRICS = ("auroc", "fpr95", "aupr_in", "aupr_out", "closed_set_acc")


def summary_rows(results: Sequence[EvalResult], metric: str) -> Tuple[List[str], List[Dict[str, Any]]]:
    """Methods as rows, targets (and their average) as columns, for one metric."""
    targets = list(dict.fromkeys(r.target for r in results))
    rows = []
    for scorer in dict.fromkeys(r.scorer for r in results):
        row: Dict[str, Any] = {"method": scorer}
        for r in results:
            if r.scorer == scorer:
                row[r.target] = r.metrics.get(metric)
        values = [row[t] for t in targets if row.get(t) is not None]
        if len(targets) > 1:
            row["average"] = float(np.mean(values)) if len(values) == len(targets) else None
        rows.append(row)
    columns = targets + (["average"] if len(targets) > 1 else [])
    return columns, rows


def format_table(results: Sequence[EvalResult], metrics: Sequence[str] = ("auroc", "fpr95")) -> str:
    """One block per metric: methods as rows, targets and their average as columns."""
    if not results:
        return "(no results)"
    blocks = []
    for metric in metrics:
        columns, rows = summary_rows(results, metric)
        width = max(12, *(len(c) + 2 for c in columns))
        name_width = max(20, *(len(r["method"]) + 2 for r in rows))
        header = f"{results[0].dataset + ' ' + metric:<{name_width}}" + "".join(f"{c:>{width}}" for c in columns)
        lines = [header, "-" * len(header)]
        for row in rows:
            cells = "".join(f"{'-':>{width}}" if row.get(c) is None else f"{row[c]:>{width}.4f}" for c in columns)
            lines.append(f"{row['method']:<{name_width}}{cells}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def summary_files(results: Sequence[EvalResult], eval_dir: str) -> Dict[str, str]:
    """`<dataset>_summary.json` (every metric) and `<dataset>_summary.csv` (one row per method and metric)."""
    dataset = results[0].dataset
    record = {metric: summary_rows(results, metric)[1] for metric in TABLE_METRICS}
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    columns = summary_rows(results, "auroc")[0]
    writer.writerow(["metric", "method", *columns])
    for metric in TABLE_METRICS:
        for row in record[metric]:
            writer.writerow([metric, row["method"], *("" if row.get(c) is None else f"{row[c]:.6f}" for c in columns)])
    json_path = os.path.join(eval_dir, f"{dataset}_summary.json")
    csv_path = os.path.join(eval_dir, f"{dataset}_summary.csv")
    atomic_write_text(json_path, json.dumps(record, indent=2) + "\n")
    atomic_write_text(csv_path, buffer.getvalue())
    return {"json": json_path, "csv": csv_path}


def group_identity(kind: str, dataset: str, targets: Sequence[str], record: Dict[str, Any],
                   tag: Optional[str]) -> Tuple[str, str]:
    """(group name, settings hash) of an evaluation; the name says the backbone's file when it had one."""
    digest = settings_hash(kind, dataset, targets, record)
    return group_name(dataset, record["iteration"], digest, tag, record.get("backbone_checkpoint")), digest


def draw_figures(results: Sequence[EvalResult], folder: str, save_maps: int, shown_as: str,
                 warn: Callable[[str], None]) -> List[str]:
    """The figures of a group into `folder`: ROC and histograms per dataset, anomaly maps with --save_maps N.

    A figure that cannot be drawn is one warning naming it (as `<shown_as>/<name>`) and is left out:
    the results never depend on a figure. Returns the paths drawn.
    """
    drawn = []
    for name, draw in result_figures(results) + map_figures(results, save_maps):
        try:
            drawn.append(draw(os.path.join(folder, name)))
        except Exception as error:  # whatever a figure raises (matplotlib, a vanished image), the results stay
            reason = " ".join(str(error).split()) or "no message"
            warn(f"warning: figure {os.path.join(shown_as, name)} not drawn: {type(error).__name__}: {reason}")
    return drawn


def publish_group(results: List[EvalResult], out_folder: str, record: Dict[str, Any], kind: str,
                  tag: Optional[str] = None, phases: Optional[Dict[str, float]] = None,
                  warn: Callable[[str], None] = say) -> str:
    """Write the results' group under `<out_folder>/eval/` (per-target files, summary, manifest); its path.

    `phases` (seconds per phase of the evaluation) go into the manifest, with the seconds the files
    took to write added as "writing". The figures (`roc_<dataset>.png`, `scores_<dataset>.png` and, with
    `--save_maps N` in the record, `maps_<dataset>_<target>.png` of every result with maps) are part of
    the group; one that cannot be drawn is a warning (`warn`) and is left out.
    """
    dataset = results[0].dataset
    targets = list(dict.fromkeys(result.target for result in results))
    name, digest = group_identity(kind, dataset, targets, record, tag)
    manifest = {"hash": digest, "kind": kind, "dataset": dataset, "targets": targets,
                "scorers": list(dict.fromkeys(result.scorer for result in results)),
                "iteration": record["iteration"], "settings": record, "seconds": dict(phases or {})}

    def write_files(folder: str) -> List[str]:
        # Per-target files and the summary come from the same results, in the same folder.
        start = time.perf_counter()
        paths: List[str] = []
        identity = {"name": name, "settings_hash": digest}
        for result in results:
            paths += write_eval_outputs(result, folder, record, group=identity).values()
        paths += summary_files(results, folder).values()
        paths += draw_figures(results, folder, int(record.get("save_maps") or 0),
                              os.path.join(out_folder, EVAL_DIR, name), warn)
        manifest["seconds"]["writing"] = round(time.perf_counter() - start, 3)
        return [os.path.basename(path) for path in paths]

    return write_group(os.path.join(out_folder, EVAL_DIR), name, manifest, write_files)


def phase_seconds(results: List[EvalResult], **known: float) -> Dict[str, float]:
    """Seconds per phase of an evaluation: `known` ones (e.g. load), the shared feature pass, the scorers."""
    phases = dict(known)
    if results:
        phases["features"] = results[0].seconds.get("features", 0.0)
        phases["scoring"] = sum(result.seconds.get("scoring", 0.0) for result in results)
    return {name: round(value, 3) for name, value in phases.items()}


def write_results(results: List[EvalResult], out_folder: str, record: Dict[str, Any],
                  tb_writer: Optional[TensorBoardWriter], step: int, kind: str = "periodic",
                  tag: Optional[str] = None, warn: Callable[[str], None] = say,
                  phases: Optional[Dict[str, float]] = None) -> Optional[str]:
    """Rank 0: the result group (a failure raises, naming it), then TensorBoard (a failure only warns).

    Returns the group's path (None on the other ranks or without results).
    """
    if not is_main_process() or not results:
        return None
    group = publish_group(results, out_folder, record, kind, tag, phases if phases is not None else
                          phase_seconds(results), warn)
    if tb_writer is not None:
        try:
            for result in results:
                log_to_tensorboard(tb_writer, result, step)
        except OSError as error:
            warn(f"warning: TensorBoard entries not written to {tb_writer.log_dir}: {error}")
    return group


def tensorboard_extra(results: List[EvalResult], log_dir: str, step: int,
                      warn: Callable[[str], None] = say) -> None:
    """TensorBoard entries of an --only_eval run; a folder that cannot take them only gets a warning."""
    try:
        writer = TensorBoardWriter(log_dir, enabled=True)
        try:
            for result in results:
                log_to_tensorboard(writer, result, step)
        finally:
            writer.close()
    except OSError as error:
        warn(f"warning: TensorBoard entries not written to {log_dir}: {error.strerror or error}")
