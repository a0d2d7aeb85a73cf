"""Stand-in models: the real architectures with random weights, built by code and saved like the real
checkpoints, so the offline sample run and the tests load them through the same loaders as real weights.

Their compute equals the real models' where the real size is used (SPIGA, Inception), so throughput measured
with them is honest; their outputs (landmarks, captions) mean nothing, and every report made with them says so.

One module per stand-in (:mod:`~pipelines.standins.spiga`, :mod:`~pipelines.standins.blip`,
:mod:`~pipelines.standins.stable_diffusion`, :mod:`~pipelines.standins.inception`, :mod:`~pipelines.standins.clip`,
and the offline CLIP tokenizer two of them share, :mod:`~pipelines.standins.tokenizers`). They import nothing of
the runtime modules that load the models, so the fetch stages do not re-run when loading or metric code changes;
where a stand-in needs a fact of the real model (a file name, a size) it states it and a test checks that it
equals the runtime module's.

The registry of builders is :mod:`~pipelines.standins.registry`; this package's ``__init__`` holds only
:data:`STANDIN_NOTE`, so code that merely labels stand-in results does not depend on the builders.
"""
STANDIN_NOTE = "random weights of the real architecture, built by code: outputs are meaningless, speed is real"
