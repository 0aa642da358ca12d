"""The pretraining entry (``launch/pretrain.py``) and its helper modules; see docs/main_job.md."""
