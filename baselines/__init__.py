"""Baseline objectives (MLE, MixCE, TaiLr and the EMO repository's TVD variant), reachable by name from ``emo``."""
