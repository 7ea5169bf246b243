"""Dataset source adapters: a public release's layout and metadata CSVs -> listed `SourceItem`s."""

from typing import Any

from etils import epath

from data_prep.sources.base import CHEXPERT_LABELS, FRONTAL_VIEWS, Source, SourceItem
from data_prep.sources.brax import Brax
from data_prep.sources.chexpert import CheXpert
from data_prep.sources.cxr_lt import CxrLt
from data_prep.sources.folder import Folder
from data_prep.sources.jsrt import Jsrt
from data_prep.sources.mimic_cxr import MimicCxrDicom, MimicCxrJpg
from data_prep.sources.nih import NihChestXray14
from data_prep.sources.padchest import PadChest
from data_prep.sources.shenzhen import Montgomery, Shenzhen
from data_prep.sources.vindr_cxr import VinDrCxr

_PRETRAINING = (MimicCxrJpg, MimicCxrDicom, CheXpert, PadChest, Brax, NihChestXray14, VinDrCxr)
_DOWNSTREAM = (CxrLt, Shenzhen, Montgomery, Jsrt)
SOURCES: dict[str, type[Source]] = {cls.name: cls for cls in (*_PRETRAINING, *_DOWNSTREAM, Folder)}


def get_source(name: str, root: str | epath.PathLike, metadata: str | epath.PathLike | None = None, **options: Any):
    """The adapter `name` over the release at `root` (metadata files under `metadata`, default root)."""
    if name not in SOURCES:
        raise KeyError(f"unknown source {name!r}; known: {sorted(SOURCES)}")
    return SOURCES[name](root, metadata, **options)


__all__ = ["CHEXPERT_LABELS", "FRONTAL_VIEWS", "SOURCES", "Source", "SourceItem", "get_source"]
