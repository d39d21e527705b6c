"""The S3 storage of sample images (SAMPLES_STORAGE=s3): django-storages' S3Storage, with the answers
the rest of the code expects from a storage. Imported only when configured: django-storages and
boto3 come with the s3 extra (pip install -e '.[s3]')."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from botocore.config import Config
from botocore.exceptions import ClientError
from storages.backends.s3 import S3Storage

from config.storage import SIGNED_URL_SECONDS


class SamplesS3Storage(S3Storage):
    """A bucket (AWS, MinIO, Ceph, any S3-compatible server). Every object is written by one PutObject,
    which S3 applies whole or not at all; a signed URL lets a browser fetch one image for a short time."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        # botocore's defaults wait a minute and more on an unreachable endpoint; a worker should say
        # so in seconds and put its chunk back to waiting (personas.attempts.StorageFault).
        self.client_config: Config = self.client_config.merge(
            Config(connect_timeout=5, read_timeout=30, retries={"max_attempts": 3, "mode": "standard"})
        )

    def get_default_settings(self) -> dict[str, Any]:
        return {**super().get_default_settings(), "signed_url_seconds": SIGNED_URL_SECONDS}

    def get_modified_time(self, name: str) -> datetime:
        # S3Storage lets a missing object's 404 out as ClientError; a folder says FileNotFoundError.
        try:
            return super().get_modified_time(name)
        except ClientError as exc:
            if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                raise FileNotFoundError(f"File does not exist: {name}") from exc
            raise

    def where(self) -> str:
        endpoint = f" at {self.endpoint_url}" if self.endpoint_url else ""
        return f"s3://{self.bucket_name}{endpoint}"
