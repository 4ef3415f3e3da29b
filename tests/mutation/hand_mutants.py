"""Hand-made mutants of the code mutmut 3.8 leaves alone (decorated functions, code outside functions).

    python tests/mutation/hand_mutants.py          (from the repository root; tests/MUTATION.md)

mutmut does not mutate decorated functions: the three ReSeND `score` methods (`@torch.no_grad()`)
and `RelationalScorer.prototypes` (`@property`) in evaluation/scorers/resend.py; in round 3 the
`@torch.no_grad()` methods `KnnDistanceScorer._score_oodbench`, `LinearHeadScorer.score`,
`FlowScorer.log_likelihood`, `LatentVaeScorer.score` and `PrototypeMapScorer.score`. Nor does it mutate
code outside functions: the module constants of utils/optim.py (the step decay, the LARS constants,
the valid names) and of the round-3 scorers, and the class attributes of the scorers (registered
name, `needs_*` flags, hyperparameter defaults and flags) and of the engine. (mutmut does mutate
`distance.protocol_field`, but it only runs at import, before a mutant is switched on: its mutants
are here too.) Each mutant below is one small change of the
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
DISTANCE = "evaluation/scorers/distance.py"
PROBE = "evaluation/scorers/probe.py"
CLASSIFIER = "evaluation/scorers/classifier.py"
MAPS = "evaluation/scorers/maps.py"
DENSITY = "evaluation/scorers/density.py"
LATENT = "evaluation/scorers/latent.py"
# Round 3: the [mutmut] selection's files that reach the six scorer modules, without its deselected slow tests.
ROUND3 = ["tests/test_baseline_mutants.py", "tests/test_baselines.py", "tests/test_oodbench_protocol.py",
          "tests/test_neighbour_scorers.py", "tests/test_scorer_registry.py"]
DESELECT = [f"--deselect=tests/test_neighbour_scorers.py::{name}" for name in (
    "test_backbone_returns_the_last_feature_map", "test_engine_hands_feature_maps_and_keeps_the_maps",
    "test_map_figure_picks_the_extremes", "test_command_line_runs_the_new_scorers_with_the_oodbench_protocol",
    "test_save_maps_without_a_scorer_that_maps_is_refused", "test_api_returns_the_anomaly_map_of_any_image")] + [
    "--deselect=tests/test_scorer_registry.py::test_a_registered_scorer_reaches_the_command_line_and_the_results"]
# The test files of the [mutmut] selection (setup.cfg) that reach each module.
TESTS = {
    RESEND: ["tests/test_scorers.py"],
    FEATURENORM: ["tests/test_featurenorm.py"],
    OPTIM: ["tests/test_optim.py", "tests/test_engine.py"],
    ENGINE: ["tests/test_engine.py"],
    **{path: ROUND3 + DESELECT for path in (DISTANCE, PROBE, CLASSIFIER, MAPS, DENSITY, LATENT)},
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
    # ---- round 3
    # distance.protocol_field (runs at import only)
    (DISTANCE, 'hyperparameter("this", PROTOCOL_HELP', 'hyperparameter("oodbench", PROTOCOL_HELP',
     "protocol: default oodbench"),
    (DISTANCE, 'flag="baseline_protocol", arg_type=protocol_choice)', 'flag="XXbaseline_protocolXX", '
     'arg_type=protocol_choice)', "protocol: another flag"),
    (DISTANCE, 'flag="baseline_protocol", arg_type=protocol_choice)', 'flag="baseline_protocol")',
     "protocol: flag parsed as a plain string"),
    (DISTANCE, 'PROTOCOLS = ("this", "oodbench")', 'PROTOCOLS = ("this", "XXoodbenchXX")', "oodbench not a protocol"),
    # KnnDistanceScorer._score_oodbench
    (DISTANCE, "        if self.normalize:\n            targets = F.normalize(targets, dim=1)",
     "        if not self.normalize:\n            targets = F.normalize(targets, dim=1)", "knn oodbench: normalize inverted"),
    (DISTANCE, "rows = max(1, EXACT_BLOCK_ELEMENTS // self.support.shape[0])",
     "rows = max(2, EXACT_BLOCK_ELEMENTS // self.support.shape[0])", "knn oodbench: blocks of at least 2 rows"),
    (DISTANCE, "order = torch.argsort(dist, dim=1, stable=True)[:, :self.k]",
     "order = torch.argsort(dist, dim=1, stable=True)[:, :1]", "knn oodbench: k ignored"),
    (DISTANCE, "order = torch.argsort(dist, dim=1, stable=True)[:, :self.k]",
     "order = torch.argsort(dist, dim=1, descending=True, stable=True)[:, :self.k]", "knn oodbench: farthest"),
    (DISTANCE, "order = torch.argsort(dist, dim=1, stable=True)[:, :self.k]",
     "order = torch.argsort(dist, dim=1, stable=False)[:, :self.k]", "knn oodbench: unstable order of ties"),
    (DISTANCE, "kth = torch.gather(dist, 1, order[:, -1:]).squeeze(1)",
     "kth = torch.gather(dist, 1, order[:, :1]).squeeze(1)", "knn oodbench: nearest, not k-th"),
    (DISTANCE, "normality.append(-kth * kth)", "normality.append(-kth)", "knn oodbench: distance, not squared"),
    (DISTANCE, "pred.append(votes.argmax(dim=1))", "pred.append(votes.argmin(dim=1))", "knn oodbench: minority vote"),
    (DISTANCE, "pred.append(votes.argmax(dim=1))", "pred.append(self.support_labels[order[:, 0]])",
     "knn oodbench: nearest label, no vote"),
    (DISTANCE, "            return ScoreResult(normality=targets.new_empty(0), pred=self.support_labels.new_empty(0))\n"
     "        return ScoreResult(normality=torch.cat(normality), pred=torch.cat(pred))\n\n\ndef ledoit",
     "            return ScoreResult(normality=targets.new_empty(1), pred=self.support_labels.new_empty(0))\n"
     "        return ScoreResult(normality=torch.cat(normality), pred=torch.cat(pred))\n\n\ndef ledoit",
     "knn oodbench: one score for no features"),
    (DISTANCE, "EXACT_BLOCK_ELEMENTS = 2 ** 24", "EXACT_BLOCK_ELEMENTS = 2 ** 25", "knn oodbench: twice the block"),
    (DISTANCE, '@register_scorer("knn", ', '@register_scorer("XXknnXX", ', "knn registered under another name"),
    (DISTANCE, 'hyperparameter(1, "K: prototypes per class or neighbours", flag="NNK"',
     'hyperparameter(2, "K: prototypes per class or neighbours", flag="NNK"', "knn: default k 2"),
    (DISTANCE, 'normalize: bool = hyperparameter(True,', 'normalize: bool = hyperparameter(False,',
     "knn: raw features by default"),
    # LinearProbeScorer class constants
    (PROBE, "OODBENCH_C = 0.316", "OODBENCH_C = 1.316", "probe: C 1.316"),
    (PROBE, "OODBENCH_MAX_ITER = 1000", "OODBENCH_MAX_ITER = 1", "probe: liblinear max_iter 1"),
    (PROBE, "max_iter: int = hyperparameter(1000,", "max_iter: int = hyperparameter(1,", "probe: default max_iter 1"),
    # LinearHeadScorer.score
    (CLASSIFIER, "pred=plain.argmax(dim=1)", "pred=self.logits(self.transform(feats)).argmax(dim=1)",
     "logit scorers: prediction on the shaped features"),
    (CLASSIFIER, "normality=self.reduce(self.logits(self.transform(feats)))", "normality=self.reduce(self.logits(feats))",
     "logit scorers: no transform"),
    (CLASSIFIER, "        feats = scored.feats.to(torch.float64)\n        plain", "        feats = scored.feats\n        plain",
     "logit scorers: shaped in the features' dtype"),
    (CLASSIFIER, 'check_scored(scored.feats, self.weight, "head weights")',
     'check_scored(scored.feats, self.weight, "XXhead weightsXX")', "logit scorers: message names another reference"),
    (CLASSIFIER, "    shapes_activations: ClassVar[bool] = True\n\n    percentile: float = hyperparameter(90.0",
     "    shapes_activations: ClassVar[bool] = False\n\n    percentile: float = hyperparameter(90.0",
     "react: does not shape activations"),
    (CLASSIFIER, "    shapes_activations: ClassVar[bool] = True\n\n    percentile: float = hyperparameter(65.0",
     "    shapes_activations: ClassVar[bool] = False\n\n    percentile: float = hyperparameter(65.0",
     "ash_b: does not shape activations"),
    (CLASSIFIER, "hyperparameter(90.0, ", "hyperparameter(91.0, ", "react: default percentile 91"),
    (CLASSIFIER, "hyperparameter(65.0, ", "hyperparameter(66.0, ", "ash_b: default percentile 66"),
    (CLASSIFIER, '@register_scorer("energy", ', '@register_scorer("XXenergyXX", ', "energy registered under another name"),
    # PrototypeMapScorer.score and class attributes
    (MAPS, "worst = flat.amax(dim=1)", "worst = flat.amin(dim=1)", "prototype_map: best location for min"),
    (MAPS, 'worst if self.reduction == "min" else', 'worst if self.reduction == "mean" else',
     "prototype_map: reductions swapped"),
    (MAPS, "normality = 1.0 - (worst", "normality = -(worst", "prototype_map: minus the novelty"),
    (MAPS, "pred=pooled.argmax(dim=1)", "pred=pooled.argmin(dim=1)", "prototype_map: least similar prototype"),
    (MAPS, "maps[start:start + MAP_CHUNK]", "maps[start:start + 1]", "prototype_map: chunks of one image"),
    (MAPS, "maps.ndim != 4 or maps.shape[0]", "maps.ndim != 4 and maps.shape[0]", "prototype_map: shape check and"),
    (MAPS, "maps.new_empty(0, *maps.shape[2:], dtype=torch.float32)",
     "maps.new_empty(0, *maps.shape[2:], dtype=torch.float64)", "prototype_map: empty maps in float64"),
    (MAPS, "            maps = scored.feats[:, :, None, None]", "            maps = scored.feats[:, :, None, None] * 0",
     "prototype_map: no maps scored as zeros"),
    (MAPS, "    needs_feature_maps = True\n", "    needs_feature_maps = False\n", "prototype_map needs no feature maps"),
    (MAPS, 'REDUCTIONS = ("min", "mean")', 'REDUCTIONS = ("min", "XXmeanXX")', "mean not a reduction"),
    (MAPS, 'reduction: str = hyperparameter("min"', 'reduction: str = hyperparameter("mean"',
     "prototype_map: default reduction mean"),
    # FlowScorer.log_likelihood and constants
    (DENSITY, "+ log_det.double() + self.log_det_whitening", "+ log_det.double() - self.log_det_whitening",
     "flow: whitening log-determinant subtracted"),
    (DENSITY, "            - torch.log(self.scales.double()).sum()", "            + torch.log(self.scales.double()).sum()",
     "flow: scales' log-determinant added"),
    (DENSITY, "log_p = torch.logsumexp(joint, dim=1) + log_det.double()", "log_p = torch.logsumexp(joint, dim=1)",
     "flow: coupling log-determinant left out"),
    (DENSITY, "log_p = torch.logsumexp(joint, dim=1)", "log_p = joint.max(dim=1).values", "flow: max, not the marginal"),
    (DENSITY, "\\\n            + self.log_priors.double()", "\\\n            - self.log_priors.double()",
     "flow: priors subtracted"),
    (DENSITY, "log_p = log_p - 0.5 * residual.pow(2).sum(dim=1) / self.residual_var",
     "log_p = log_p - 1.5 * residual.pow(2).sum(dim=1) / self.residual_var", "flow: residual weight 1.5"),
    (DENSITY, "- 0.5 * n_residual * math.log(2 * math.pi * self.residual_var)",
     "- 0.5 * n_residual * math.log(math.pi * self.residual_var)", "flow: residual normaliser without 2"),
    (DENSITY, "n_residual = y.shape[1] - components.shape[1]", "n_residual = y.shape[1]",
     "flow: residual dimension count"),
    (DENSITY, "return log_p, joint.argmax(dim=1)", "return log_p, joint.argmin(dim=1)", "flow: least likely class"),
    (DENSITY, "y = ((feats.float() - self.mean) @ self.whitening).double()",
     "y = ((feats.float() + self.mean) @ self.whitening).double()", "flow: centred the wrong way"),
    (DENSITY, "VALIDATION_SHARE = 0.1", "VALIDATION_SHARE = 0.2", "flow: 20 % held out"),
    (DENSITY, "WITHIN_STD_FLOOR = 1e-2", "WITHIN_STD_FLOOR = 1e-3", "flow: spread floor 1e-3"),
    (DENSITY, "LOG_SCALE_LIMIT = 3.0", "LOG_SCALE_LIMIT = 4.0", "flow: log-scale limit 4"),
    (DENSITY, 'dims: int = hyperparameter(64,', 'dims: int = hyperparameter(65,', "flow: default dims 65"),
    (DENSITY, 'epochs: int = hyperparameter(20,', 'epochs: int = hyperparameter(21,', "flow: default epochs 21"),
    # LatentVaeScorer.score and constants
    (LATENT, "x = (scored.feats.float() - self.mean) / self.std", "x = (scored.feats.float() - self.mean) * self.std",
     "latent_vae: scored features scaled the wrong way"),
    (LATENT, "distance, pred = torch.cdist(mu, self.latent_means.double()).min(dim=1)",
     "distance, pred = torch.cdist(mu, self.latent_means.double()).max(dim=1)", "latent_vae: farthest class"),
    (LATENT, "            novelty = distance * relative\n", "            novelty = distance\n",
     "latent_vae: reconstruction error ignored"),
    (LATENT, "relative = self._reconstruction_error(x).double() / self.recon_scale",
     "relative = self._reconstruction_error(x).double() * self.recon_scale", "latent_vae: times the median error"),
    (LATENT, 'extra["latent_distance"] = -distance', 'extra["latent_distance"] = distance',
     "latent_vae: latent_distance sign"),
    (LATENT, "return ScoreResult(normality=-novelty", "return ScoreResult(normality=novelty",
     "latent_vae: novelty as normality"),
    (LATENT, "        if self.ae_features:\n            relative", "        if not self.ae_features:\n            relative",
     "latent_vae: ae_features inverted when scoring"),
    (LATENT, "POSITIVE_MARGIN = 0.1", "POSITIVE_MARGIN = 1.1", "latent_vae: positive margin 1.1"),
    (LATENT, "PRIOR_STD = 0.1", "PRIOR_STD = 1.1", "latent_vae: prior std 1.1"),
    (LATENT, "MARGIN_START = 0.15", "MARGIN_START = 1.15", "latent_vae: margin starts at 1.15"),
    (LATENT, "MIN_BATCHES_PER_EPOCH = 8", "MIN_BATCHES_PER_EPOCH = 9", "latent_vae: at least 9 batches"),
    (LATENT, "STD_FLOOR = 1e-3", "STD_FLOOR = 1e-2", "latent_vae: std floor 1e-2"),
    (LATENT, 'latent_dim: int = hyperparameter(32,', 'latent_dim: int = hyperparameter(33,',
     "latent_vae: default latent_dim 33"),
    (LATENT, 'ae_features: bool = hyperparameter(False,', 'ae_features: bool = hyperparameter(True,',
     "latent_vae: ae_features on by default"),
]
# Mutants that change nothing a caller can observe (tests/MUTATION.md): reported, not counted as survivors.
EQUIVALENT = {
    "knn: --NNK parsed as a plain int": "the --NNK flag is parsed with the type of the first registered scorer "
                                        "that reads it (resend_msp); resend_knn's is never used",
    "engine: another initial log period": "train() sets the period's start before its first log_period; the "
                                          "field default is a placeholder",
    "knn oodbench: unstable order of ties": "on the CPU torch's argsort keeps ties in index order with "
                                            "stable=False too; the flag matters on other devices",
    "knn oodbench: twice the block": "a memory bound only: the scores do not depend on the block size (tested "
                                     "with the bound monkeypatched to 3, 8 and 12 elements)",
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
