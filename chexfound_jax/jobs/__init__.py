"""What every job (pretraining, evaluation, experiments) needs: checkpoints, metric logs, progress."""
