"""balance's settings: the entry list, the cap t, and what happens to a caption that matches none."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.configbase import Section, ShardMapSettings, keeps_output, require


@dataclass(frozen=True, kw_only=True)
class BalanceConfig(ShardMapSettings):
    entries: str | None = keeps_output(None)
    """A text file of entries (concepts), one per line: one or more words, matched as whole words in the
    caption, case-insensitively (MetaCLIP's metadata: WordNet synsets, Wikipedia titles, ...). Its content
    enters the fingerprint, not its path. None: the run's own caption vocabulary, every word (not an English function
    word) that at least `min_count` captions of the input use."""
    t: int = 20000
    """The cap: an entry that more captions match keeps about t of them, drawn with the run's seed
    (MetaCLIP: 20,000 for 400M pairs). A pair is kept if any entry it matches draws it."""
    min_count: int = 2
    """The default entry list's floor: a word fewer captions use is not an entry."""
    keep_unmatched: bool = False
    """Keep a pair whose caption matches no entry (MetaCLIP drops it: `balance_no_entry`)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.t >= 1, "t: must be >= 1")
        require(self.min_count >= 1, "min_count: must be >= 1")


SECTION = Section(BalanceConfig, optional=True)   # the run config's `balance:` section
