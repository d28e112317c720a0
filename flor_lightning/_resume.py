"""Resuming a crashed or stopped run from its last complete checkpoint, in the same run's records.

This is the read: where that checkpoint is. The run session (:mod:`flor_lightning._session`) reopens the run.
"""

from __future__ import annotations

from pathlib import Path

from flor_lightning import _runs
from flor_lightning._errors import CheckpointError
from flor_lightning._locate import open_fs
from flor_lightning._query import open_store


def last_checkpoint(run: str | None = None, *, db: str | Path | None = None) -> str:
    """The path (or URL) of the newest complete checkpoint of ``run`` (default: the latest run), at an
    epoch's end or inside one (at a validation point, or every N steps: ``checkpoint_every_n_steps``).

    Pass it to Lightning to continue the run where its last checkpoint left it; flor then keeps
    recording into the same run, restores every RNG state, and drops the values the run logged
    after that checkpoint, so no row is stored twice. The path names a manifest (its tensors are
    blobs beside it): Lightning reads it through the checkpoint IO a ``FlorCallback`` puts on the
    Trainer (``flor.Trainer`` has one)::

        trainer = flor.Trainer(max_epochs=10)
        trainer.fit(model, datamodule=dm, ckpt_path=flor.last_checkpoint(run_id))

    Raises:
        UnknownRunError: the store holds no run ``run``.
        CheckpointError: the run has no complete checkpoint.
    """
    conn = open_store(db)
    try:
        if run is None:
            latest = conn.execute("SELECT run_id FROM runs ORDER BY started DESC LIMIT 1").fetchone()
            if latest is None:
                raise CheckpointError("no run has been recorded in this project yet")
            run = str(latest[0])
        row = conn.execute(
            "SELECT c.path, r.checkpoint_root FROM checkpoints c JOIN runs r USING (run_id) "
            "WHERE run_id = ? ORDER BY epoch DESC, c.batch_idx IS NULL DESC, c.batch_idx DESC LIMIT 1",
            [run],
        ).fetchone()
        if row is None:
            _runs.check_known(conn, [run])
            raise CheckpointError(
                f"run {run!r} has no complete checkpoint; it crashed before its first epoch ended, so start it again"
            )
        path, root = str(row[0]), str(row[1])
        return open_fs(root)[0].unstrip_protocol(path) if "://" in root else path
    finally:
        conn.close()
