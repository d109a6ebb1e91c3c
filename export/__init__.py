"""Export of a trained head, the frozen encoders and the catalog as a validated on-device bundle.

* :mod:`export.spec` -- declarative specs: named inputs/outputs with dynamic axes, traced and checked sizes,
  TFLite signatures, fidelity bars;
* :mod:`export.onnx_export`, :mod:`export.tflite_export` -- conversion and quantisation per backend;
* :mod:`export.validate` -- names, shapes and values of every file, and the whole pipeline's ranking fidelity;
* :mod:`export.probes` -- the probe inputs and held-out slates validation runs on;
* :mod:`export.catalog` -- the feature store packed as the bundle's int8 catalog;
* :mod:`export.bundle` -- ``export_bundle`` / ``export_from_checkpoint``: staging, validation, atomic rename;
* :mod:`export.cli` -- ``fedrank export | rerank | bench ondevice`` (``add_commands``);
* :mod:`export.bench` -- the on-device benchmark (also ``benchmarks/ondevice.py``).

The bundle format and the torch-free runtime live in ``client/runtime_bundle.py`` and ``client/runtime*.py``; the
features the head gets, in ``shared_model/head_features.py``.
Nothing is imported here, so ``import export.cli`` stays cheap.
"""
