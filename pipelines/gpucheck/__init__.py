"""The prepared GPU check (``make gpu-check``, :mod:`stages.gpu_check`): a budget runner and the measurements."""
