"""Configuration of the training data stream."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DataConfig:
    # Shard URLs: a directory holding manifest.json, a path, brace notation
    # (shard-{000000..000127}.tar) or a `pipe:` command.
    train_urls: str
    val_urls: str | None = None
    batch_per_rank: int = 64
    num_workers: int = 0
    shuffle_buffer: int = 1000
    # Sample field used as the conditioning label: None (unconditional), "cls" (class
    # index) or a key of the sample's .json metadata (e.g. "temperature").
    label_key: str | None = None

    def validate(self) -> None:
        from pipeline.config import ConfigError

        if self.batch_per_rank <= 0:
            raise ConfigError(f"data.batch_per_rank must be a positive integer, got {self.batch_per_rank}")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {self.num_workers}")
        if self.shuffle_buffer < 1:
            raise ConfigError(f"data.shuffle_buffer must be >= 1, got {self.shuffle_buffer}")
