"""Dataset indexes, one module per on-disk format; importing this package registers them all."""

from iad_lightning.data.formats import (  # noqa: F401  (imported to register the formats)
    anomalyclip_meta,
    btad,
    folder,
    images,
    mvtec,
    mvtec_loco,
    realiad,
    synthetic,
    visa,
)
