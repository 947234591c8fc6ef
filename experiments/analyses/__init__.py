"""One-off analyses of EXPERIMENTS.md on the real NIfTI cases, each run as
`python -m experiments.analyses.<name>`:

* `segmentation_ablation`: cross-validated training variants (segmentation options, the
  generalisation recipe's parts) and their selection rules;
* `postprocessing_ablation`: TTA and post-processing rows of one run, tuned on tuning cases;
* `region_thresholds`: out-of-fold scores of region probabilities per decision threshold;
* `failure_factors`: which case properties go with a low whole-tumour Dice;
* `crop_core_coverage`: how much of a slice's tumour core a foreground training crop holds,
  per sampling rule.

Their kept score records are in `experiments/results/`.
"""
