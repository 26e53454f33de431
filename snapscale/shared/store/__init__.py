"""The store: content-addressed chunks and signed manifests on S3 or a local directory, the host
cache, prefetch, materialize, and checkpoint upload / verify / GC. Services import these names,
not the modules.
"""

from snapscale.shared.store.assemble import materialize
from snapscale.shared.store.backend import (
    MANIFESTS,
    ChunkStore,
    NotFoundError,
    RetryableStoreError,
    check_manifest_key,
    manifest_key,
    open_store,
)
from snapscale.shared.store.cache import HostCache
from snapscale.shared.store.checkpoint import (
    DEFAULT_GC_GRACE_S,
    EarlyUpload,
    collect_garbage,
    fetch_manifest,
    upload_image,
    upload_weights,
    verify_checkpoint,
)
from snapscale.shared.store.landing import ImageSink
from snapscale.shared.store.manifest import Manifest, ManifestError
from snapscale.shared.store.prefetch import Prefetcher, split_weights

__all__ = [
    "DEFAULT_GC_GRACE_S",
    "MANIFESTS",
    "ChunkStore",
    "EarlyUpload",
    "HostCache",
    "ImageSink",
    "Manifest",
    "ManifestError",
    "NotFoundError",
    "Prefetcher",
    "RetryableStoreError",
    "check_manifest_key",
    "collect_garbage",
    "fetch_manifest",
    "manifest_key",
    "materialize",
    "open_store",
    "split_weights",
    "upload_image",
    "upload_weights",
    "verify_checkpoint",
]
