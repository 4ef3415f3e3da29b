"""Hand-made mutants of the code mutmut 3.8 leaves alone (decorated functions, code outside functions).

    python tests/mutation/hand_mutants.py          (from the repository root; tests/MUTATION.md)

mutmut does not mutate decorated functions: the three ReSeND `score` methods (`@torch.no_grad()`)
and `RelationalScorer.prototypes` (`@property`) in evaluation/scorers/resend.py. Nor does it mutate
code outside functions: the module constants of utils/optim.py (the step decay, the LARS constants,
the valid names) and the class attributes of the scorers (registered name, `needs_*` flags,
hyperparameter defaults and flags) and of the engine. Each mutant below is one small change of the
kind mutmut makes; the working tree is copied to a temporary folder, each mutant is applied there
alone and the test files of the [mutmut] selection that reach that module run with -x. Exits 1 if
a mutant survives that is not listed in EQUIVALENT. (The scorers' one-line summaries, help text
only, are left out.)
"""
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RESEND = "evaluation/scorers/resend.py"
FEATURENORM = "evaluation/scorers/featurenorm.py"
OPTIM = "utils/optim.py"
ENGINE = "training/engine.py"
# The test files of the [mutmut] selection (setup.cfg) that reach each module.
TESTS = {
    RESEND: ["tests/test_scorers.py"],
    FEATURENORM: ["tests/test_featurenorm.py"],
    OPTIM: ["tests/test_optim.py", "tests/test_engine.py"],
    ENGINE: ["tests/test_engine.py"],
}
MSP_K = 'flag="NNK",\n                            arg_type=positive_int)\n    prototype_labels'
KNN_K = 'flag="NNK",\n                            arg_type=positive_int)\n    support_labels'

# (file, exact text, replacement, what the mutant does)
MUTANTS = [
    (RESEND, "        return self.references\n", "        return None\n", "prototypes returns None"),
    # RelationalPrototypeScorer.score
    (RESEND, "normality, pred = torch.softmax(sim, dim=1).max(dim=1)",
     "normality, pred = torch.softmax(sim, dim=0).max(dim=1)", "resend: softmax over targets"),
    (RESEND, "normality, pred = torch.softmax(sim, dim=1).max(dim=1)",
     "normality, pred = sim.max(dim=1)", "resend: no softmax"),
    (RESEND, "normality, pred = torch.softmax(sim, dim=1).max(dim=1)",
     "normality, pred = torch.softmax(sim, dim=1).min(dim=1)", "resend: min instead of max"),
    (RESEND, 'extra={"max_logit": sim.max(dim=1).values}', 'extra={"max_logit": sim.min(dim=1).values}',
     "resend: max_logit is the min"),
    (RESEND, 'extra={"max_logit": sim.max(dim=1).values}', 'extra={"XXmax_logitXX": sim.max(dim=1).values}',
     "resend: max_logit key renamed"),
    (RESEND, "    @torch.no_grad()\n    def score(self, scored: FeatureBatch) -> ScoreResult:\n        \"\"\"Normality = max over classes of the softmax",
     "    def score(self, scored: FeatureBatch) -> ScoreResult:\n        \"\"\"Normality = max over classes of the softmax",
     "resend: score without no_grad"),
    # MostSignificantPrototypesScorer.score
    (RESEND, "index = self.prototype_labels.unsqueeze(0)", "index = self.prototype_indices.unsqueeze(0)",
     "msp: grouped by prototype index, not class"),
    (RESEND, '(sim.shape[0], self.n_classes), -float("inf")', '(sim.shape[0], self.n_classes), 0.0',
     "msp: class scores start at 0"),
    (RESEND, '(sim.shape[0], self.n_classes), -float("inf")', '(sim.shape[0], self.n_classes), +float("inf")',
     "msp: class scores start at +inf"),
    (RESEND, 'reduce="amax"', 'reduce="amin"', "msp: worst prototype per class"),
    (RESEND, 'reduce="amax"', 'reduce="sum"', "msp: sum over a class's prototypes"),
    (RESEND, 'reduce="amax"', 'reduce="mean"', "msp: mean over a class's prototypes"),
    (RESEND, "normality, pred = class_scores.max(dim=1)", "normality, pred = class_scores.min(dim=1)",
     "msp: min over classes"),
    (RESEND, "max_softmax = torch.softmax(class_scores, dim=1).max(dim=1).values",
     "max_softmax = torch.softmax(class_scores, dim=0).max(dim=1).values", "msp: softmax over targets"),
    (RESEND, "max_softmax = torch.softmax(class_scores, dim=1).max(dim=1).values",
     "max_softmax = class_scores.max(dim=1).values", "msp: max_softmax without softmax"),
    (RESEND, "    @torch.no_grad()\n    def score(self, scored: FeatureBatch) -> ScoreResult:\n        \"\"\"Normality = max over classes of each",
     "    def score(self, scored: FeatureBatch) -> ScoreResult:\n        \"\"\"Normality = max over classes of each",
     "msp: score without no_grad"),
    # KnnRelationalScorer.score
    (RESEND, "top = torch.topk(sim, self.k, dim=1).values", "top = torch.topk(sim, self.k, dim=1, largest=False).values",
     "knn: k smallest"),
    (RESEND, "top = torch.topk(sim, self.k, dim=1).values", "top = torch.topk(sim, 1, dim=1).values",
     "knn: k ignored"),
    (RESEND, "top = torch.topk(sim, self.k, dim=1).values", "top = torch.topk(sim, self.k, dim=0).values",
     "knn: top over targets"),
    (RESEND, "pred = self.support_labels[sim.argmax(dim=1)]", "pred = self.support_labels[sim.argmin(dim=1)]",
     "knn: label of the worst-scoring sample"),
    (RESEND, "normality=top.mean(dim=1)", "normality=top.sum(dim=1)", "knn: sum of the k largest"),
    (RESEND, "normality=top.mean(dim=1)", "normality=top.max(dim=1).values", "knn: largest only"),
    (RESEND, 'extra={"max_logit": top[:, 0]}', 'extra={"max_logit": top[:, -1]}', "knn: max_logit is the k-th"),
    (RESEND, "    @torch.no_grad()\n    def score(self, scored: FeatureBatch) -> ScoreResult:\n        \"\"\"Normality = mean of the top-k",
     "    def score(self, scored: FeatureBatch) -> ScoreResult:\n        \"\"\"Normality = mean of the top-k",
     "knn: score without no_grad"),
    # class attributes (outside any function)
    (RESEND, "    needs_pair_logits = True\n", "    needs_pair_logits = False\n", "relational scorers need no pair logits"),
    (RESEND, '@register_scorer("resend", ', '@register_scorer("XXresendXX", ', "resend registered under another name"),
    (RESEND, '@register_scorer("resend_msp", ', '@register_scorer("XXresend_mspXX", ',
     "resend_msp registered under another name"),
    (RESEND, '@register_scorer("resend_knn", ', '@register_scorer("XXresend_knnXX", ',
     "resend_knn registered under another name"),
    (RESEND, 'hyperparameter(1, "K: prototypes per class or neighbours", ' + MSP_K,
     'hyperparameter(2, "K: prototypes per class or neighbours", ' + MSP_K, "msp: default k 2"),
    (RESEND, 'hyperparameter(1, "K: prototypes per class or neighbours", ' + KNN_K,
     'hyperparameter(2, "K: prototypes per class or neighbours", ' + KNN_K, "knn: default k 2"),
    (RESEND, MSP_K, MSP_K.replace('"NNK"', '"XXNNKXX"'), "msp: k read from another flag"),
    (RESEND, KNN_K, KNN_K.replace('"NNK"', '"XXNNKXX"'), "knn: k read from another flag"),
    (RESEND, MSP_K, MSP_K.replace("arg_type=positive_int", ""), "msp: --NNK parsed as a plain int"),
    (RESEND, KNN_K, KNN_K.replace("arg_type=positive_int", ""), "knn: --NNK parsed as a plain int"),
    (FEATURENORM, "    needs_block_norms = True\n", "    needs_block_norms = False\n", "featurenorm needs no block norms"),
    (FEATURENORM, '@register_scorer("featurenorm", ', '@register_scorer("XXfeaturenormXX", ',
     "featurenorm registered under another name"),
    # module constants (outside any function)
    (OPTIM, "STEP_GAMMA = 0.1\n", "STEP_GAMMA = 1.1\n", "step decay 1.1"),
    (OPTIM, "LARS_TRUST_COEFFICIENT = 0.001\n", "LARS_TRUST_COEFFICIENT = 1.001\n", "LARS trust coefficient 1.001"),
    (OPTIM, "LARS_EPS = 1e-8\n", "LARS_EPS = 1.00000001\n", "LARS eps 1 + 1e-8"),
    (OPTIM, 'OPTIMIZERS = ("sgd", "lars")', 'OPTIMIZERS = ("XXsgdXX", "lars")', "optimizer names listed wrong"),
    (OPTIM, 'SCHEDULES = ("step", "cosine")', 'SCHEDULES = ("XXstepXX", "cosine")', "step schedule not valid"),
    (OPTIM, 'SCHEDULES = ("step", "cosine")', 'SCHEDULES = ("step", "XXcosineXX")', "cosine schedule not valid"),
    (ENGINE, "field(default=(0.0, 0), init=False)", "field(default=(1.0, 1), init=False)",
     "engine: another initial log period"),
]
# Mutants that change nothing a caller can observe (tests/MUTATION.md): reported, not counted as survivors.
EQUIVALENT = {
    "knn: --NNK parsed as a plain int": "the --NNK flag is parsed with the type of the first registered scorer "
                                        "that reads it (resend_msp); resend_knn's is never used",
    "engine: another initial log period": "train() sets the period's start before its first log_period; the "
                                          "field default is a placeholder",
}


def copy_tree(destination: Path) -> None:
    """The tracked and untracked (not ignored) files of the working tree."""
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           check=True, capture_output=True).stdout.split(b"\0")
    for name in names:
        source = REPO / os.fsdecode(name)
        if name and source.is_file():
            target = destination / os.fsdecode(name)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def main() -> int:
    survivors = equivalent = 0
    with tempfile.TemporaryDirectory(prefix="resend-hand-mutants-") as work:
        work = Path(work)
        copy_tree(work)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
        every_test = sorted({name for names in TESTS.values() for name in names})
        clean = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *every_test],
                               cwd=work, env=env, capture_output=True, text=True, check=False)
        if clean.returncode != 0:
            print(clean.stdout[-3000:], clean.stderr[-3000:])
            print("the tests fail without any mutant")
            return 2
        for number, (path, old, new, what) in enumerate(MUTANTS, start=1):
            original = (work / path).read_text()
            if original.count(old) != 1:
                print(f"{number:2d} NOT APPLIED (text found {original.count(old)} times): {what}")
                survivors += 1
                continue
            (work / path).write_text(original.replace(old, new))
            try:
                result = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                                         *TESTS[path]],
                                        cwd=work, env=env, capture_output=True, text=True, check=False)
            finally:
                (work / path).write_text(original)
            killed = result.returncode != 0
            if killed:
                failed = next((line for line in result.stdout.splitlines() if line.startswith("FAILED")), "")
                print(f"{number:2d} killed   {what}  {failed[:110]}")
            elif what in EQUIVALENT:
                equivalent += 1
                print(f"{number:2d} survived {what}  (equivalent: {EQUIVALENT[what]})")
            else:
                survivors += 1
                print(f"{number:2d} SURVIVED {what}")
    killed_count = len(MUTANTS) - survivors - equivalent
    print(f"{killed_count}/{len(MUTANTS)} hand-made mutants killed, {equivalent} equivalent, {survivors} survived")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
