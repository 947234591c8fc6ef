"""Inference: whole-volume prediction in slice batches (`whole_volume`), runs loaded and
averaged as an ensemble (`ensembles`), predicting and writing cases (`case_prediction`, from
`case_lists`), post-processing (`postprocess`; which one a run or ensemble applies:
`postprocess_choice`; choosing it on labelled cases: `postprocess_tuning`), voxel-wise
uncertainty (`uncertainty`) and the split of a case list over machines (`work_split`)."""
