"""Per-module mutation results of a mutmut run (run in its work folder): killed/total and survivors.

    python tests/mutation/summary.py [MODULE ...]      (run by tests/mutation/run.sh)
"""
import json
import sys
from collections import Counter
from pathlib import Path

FILES = {
    "metrics": "evaluation/metrics.py", "pairs": "datasets/pairs.py", "objective": "models/objective.py",
    "state_dicts": "models/state_dicts.py", "atomic_files": "utils/atomic_files.py",
    "plots": "evaluation/plots.py",
    # second round
    "resend": "evaluation/scorers/resend.py", "featurenorm": "evaluation/scorers/featurenorm.py",
    "optim": "utils/optim.py", "engine": "training/engine.py",
    # third round
    "distance": "evaluation/scorers/distance.py", "probe": "evaluation/scorers/probe.py",
    "classifier": "evaluation/scorers/classifier.py", "maps": "evaluation/scorers/maps.py",
    "density": "evaluation/scorers/density.py", "latent": "evaluation/scorers/latent.py",
}
# mutmut's exit-code meanings (mutmut.stats.status_by_exit_code) for the codes a run records.
STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 34: "skipped",
          36: "timeout", 24: "timeout", -24: "timeout", 152: "timeout", 255: "timeout",
          None: "not checked", -11: "segfault", -9: "segfault"}


def main(names: list[str]) -> int:
    """Print one line per module and the names of the mutants that were not killed."""
    worst = 1.0
    for name in names or list(FILES):
        meta = Path("mutants") / (FILES[name] + ".meta")
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        status = {key: STATUS.get(code, "suspicious") for key, code in codes.items()}
        counts = Counter(status.values())
        # A timeout means the mutant hung the tests: it was detected, as mutmut counts it.
        killed = counts["killed"] + counts["timeout"]
        total = len(status)
        worst = min(worst, killed / total)
        print(f"{FILES[name]:34s} killed {killed:4d}/{total:<4d} ({100 * killed / total:5.1f} %)  "
              + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()) if k != "killed"))
        for key in sorted(k for k, s in status.items() if s not in ("killed", "timeout")):
            print(f"    {status[key]:12s} {key}")
    return 0 if worst >= 0.9 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
