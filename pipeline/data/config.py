"""Configuration of the training data stream."""

from __future__ import annotations

from dataclasses import dataclass
from pipeline.errors import ConfigError


@dataclass
class DataConfig:
    # Shard URLs: a directory holding manifest.json, a path, brace notation
    # (shard-{000000..000127}.tar) or a `pipe:` command; or the same in an object store
    # (s3://bucket/prefix/ holding manifest.json, s3://bucket/p/train-{000000..000009}.tar;
    # gs://, hf://, https:// alike), credentials and endpoint from the environment.
    train_urls: str
    val_urls: str | None = None
    batch_per_rank: int = 64
    num_workers: int = 0
    shuffle_buffer: int = 1000
    # Sample field used as the conditioning label: None (unconditional), "cls" (class
    # index) or a key of the sample's .json metadata (e.g. "temperature").
    label_key: str | None = None
    # Check of a manifest directory's shards when a stream opens it: "size" (cheap, always
    # sensible), "sha256" (reads every shard once more) or "off". Mismatches are warned
    # about and their damaged samples skipped; a missing shard is an error.
    verify: str = "size"

    def validate(self) -> None:
        from pipeline.data.storage import check_url  # stdlib only

        for urls in (self.train_urls, self.val_urls):
            if urls:
                check_url(urls)  # credentials never in a URL of the config
        if self.batch_per_rank <= 0:
            raise ConfigError(f"data.batch_per_rank must be a positive integer, got {self.batch_per_rank}")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {self.num_workers}")
        if self.shuffle_buffer < 1:
            raise ConfigError(f"data.shuffle_buffer must be >= 1, got {self.shuffle_buffer}")
        if self.verify not in ("off", "size", "sha256"):
            raise ConfigError(f"data.verify must be one of off, size, sha256, got {self.verify!r}")
        if self.label_key is not None and (not self.label_key or self.label_key.startswith("_")):
            raise ConfigError(
                f"data.label_key must be null, 'cls' or a key of the samples' json metadata, got {self.label_key!r}"
            )
