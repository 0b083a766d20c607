"""The ledger of what the samples job made: renders, uploads to Immich, evaluations.

The tables are store migration 7; this class reads and writes them through the
:class:`~daemon.store.Store` (the single owner of the database), as ``TrainingSet`` does for
the ``training`` table.

* ``renders``: one image per (kind, step, prompt_key).  ``kind`` is ``"sample"`` for a
  validation prompt rendered by a checkpoint (step 0 is the base model) or ``"timelapse"`` for
  a frame of a ``darkroom timelapse --prompt`` rendered outside the validation list.
* ``uploads``: a file put in Immich, by a key naming what it is (``sample/500/<prompt_key>``,
  ``timelapse/<prompt_key>/<last step>``...).  A key present means: never upload it again.
* ``evaluations``: the held-out loss per timestep bin of each checkpoint, for one held-out set
  (``set_digest`` names its samples, so only figures on the same set are compared).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from daemon.store import Store, utc_now

SAMPLE, FRAME = "sample", "timelapse"


@dataclass(frozen=True)
class Render:
    """One rendered image on disk."""

    kind: str
    step: int
    prompt_key: str
    prompt: str
    seed: int
    path: Path
    clip_score: float | None = None


@dataclass(frozen=True)
class Evaluation:
    """A checkpoint's held-out loss, by timestep bin (see ``trainer/evaluate.py``)."""

    step: int
    set_digest: str
    samples: int
    early: float
    middle: float
    late: float
    overall: float


@dataclass(frozen=True)
class Upload:
    """A file darkroom put into Immich."""

    key: str
    sha1: str
    asset_id: str
    album_id: str | None


_RENDER_COLUMNS = "kind, step, prompt_key, prompt, seed, path, clip_score"
_EVALUATION_COLUMNS = "step, set_digest, samples, early, middle, late, overall"


class Results:
    """Reads and writes the samples job's tables (store migration 7)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    # -- renders ----------------------------------------------------------------------------

    def add_render(self, render: Render) -> None:
        """Record an image written to disk (replacing a record of the same image)."""
        with self.store.transaction() as conn:
            conn.execute(
                f"INSERT OR REPLACE INTO renders ({_RENDER_COLUMNS}, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (render.kind, render.step, render.prompt_key, render.prompt, render.seed,
                 str(render.path), render.clip_score, utc_now()),
            )  # fmt: skip

    def renders(self, kind: str, prompt_key: str | None = None) -> list[Render]:
        """Renders of a kind (of one prompt, if given) whose file still exists, by step."""
        sql = f"SELECT {_RENDER_COLUMNS} FROM renders WHERE kind = ?"
        params: tuple[object, ...] = (kind,)
        if prompt_key is not None:
            sql, params = sql + " AND prompt_key = ?", (kind, prompt_key)
        rows = self.store.read(sql + " ORDER BY step, prompt_key", params)
        found = [Render(r[0], r[1], r[2], r[3], r[4], Path(r[5]), r[6]) for r in rows]
        return [render for render in found if render.path.is_file()]

    def rendered(self, kind: str) -> set[tuple[int, str]]:
        """(step, prompt_key) of every render of a kind whose file exists, read once per run."""
        return {(render.step, render.prompt_key) for render in self.renders(kind)}

    # -- uploads ----------------------------------------------------------------------------

    def upload(self, key: str) -> Upload | None:
        """What was uploaded under ``key``, if anything."""
        rows = self.store.read(
            "SELECT key, sha1, asset_id, album_id FROM uploads WHERE key = ?", (key,)
        )
        return Upload(*rows[0]) if rows else None

    def add_upload(self, upload: Upload) -> None:
        """Record a file now in Immich (and in the album, when ``album_id`` is set)."""
        with self.store.transaction() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO uploads (key, sha1, asset_id, album_id, uploaded_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (upload.key, upload.sha1, upload.asset_id, upload.album_id, utc_now()),
            )

    def upload_count(self) -> int:
        """How many files darkroom has put into Immich."""
        return int(self.store.read("SELECT COUNT(*) FROM uploads")[0][0])

    # -- evaluations ------------------------------------------------------------------------

    def add_evaluation(self, evaluation: Evaluation) -> None:
        """Record a checkpoint's held-out figures on a held-out set."""
        with self.store.transaction() as conn:
            conn.execute(
                f"INSERT OR REPLACE INTO evaluations ({_EVALUATION_COLUMNS}, evaluated_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (evaluation.step, evaluation.set_digest, evaluation.samples, evaluation.early,
                 evaluation.middle, evaluation.late, evaluation.overall, utc_now()),
            )  # fmt: skip

    def evaluations(self, set_digest: str) -> list[Evaluation]:
        """Every checkpoint's figures on one held-out set, by step."""
        rows = self.store.read(
            f"SELECT {_EVALUATION_COLUMNS} FROM evaluations WHERE set_digest = ? ORDER BY step",
            (set_digest,),
        )
        return [Evaluation(*row) for row in rows]

    def latest_evaluations(self) -> list[Evaluation]:
        """The figures on the most recently used held-out set."""
        rows = self.store.read(
            "SELECT set_digest FROM evaluations ORDER BY evaluated_at DESC, step DESC LIMIT 1"
        )
        return self.evaluations(rows[0][0]) if rows else []
