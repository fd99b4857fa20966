"""compactvl as an lmms-eval model (``lmms-eval --model compactvl``) and local lmms-eval tasks over synthvqa /
easy-vqa (docs/lmms-eval.md).

    compactvl data export --set synthvqa --split test --n 200 --format lmms --out data/lmms
    lmms-eval --model compactvl --model_args pretrained=reference,method=visionzip,tokens=16 \\
        --tasks compactvl_synthvqa --include_path data/lmms

lmms-eval finds the model through the ``lmms_eval.models`` entry point (pyproject.toml), which calls
:func:`manifest`; the model class lives in ``compactvl.lmms.model`` and is imported only by lmms-eval. Modules:
``loading`` (model args -> a loaded, compressed model; no lmms-eval needed), ``model`` (the lmms class),
``export`` (a dataset -> parquet + task YAMLs) and ``taskfns`` (the tasks' prompt and scoring functions, the same
answer normalisation as ``compactvl eval``). Nothing here is imported by the rest of compactvl.
"""
from __future__ import annotations

MODEL_ID = "compactvl"
CLASS_PATH = "compactvl.lmms.model.CompactVL"


def manifest():
    """The ``lmms_eval.models`` entry point: lmms-eval's ``ModelManifest`` naming the model class by path (so the
    class, and torch, load only when a run asks for ``--model compactvl``)."""
    from lmms_eval.models.registry_v2 import ModelManifest  # lazy: only lmms-eval calls this, with lmms-eval present

    return ModelManifest(model_id=MODEL_ID, simple_class_path=CLASS_PATH)
