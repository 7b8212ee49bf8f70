"""``custom_dataset`` loaders of prehab's lm-eval task YAMLs (lm-eval imports this file by path).

lm-eval calls a loader with the task's metadata as keyword arguments, which :func:`prehab.zeroshot.zero_shot`
sets: ``prehab_data_dir`` (without it, e.g. from lm-eval's own command line: ``$PREHAB_DATA``, else
``../shared/data``) and ``prehab_train_split`` (read ``train.tsv``, the few-shot examples; default true).
"""

from prehab.zeroshot import load_glue


def rte(prehab_data_dir=None, prehab_train_split=True, **metadata):
    return load_glue("prehab_rte", prehab_data_dir, train=prehab_train_split)


def sst2(prehab_data_dir=None, prehab_train_split=True, **metadata):
    return load_glue("prehab_sst2", prehab_data_dir, train=prehab_train_split)


def mrpc_completion(prehab_data_dir=None, prehab_train_split=True, **metadata):
    return load_glue("prehab_mrpc_completion", prehab_data_dir, train=prehab_train_split)
