"""The streaming writer: shards from a Plan, by byte ranges, into a folder renamed when complete."""

from surgeon.writer.output import MANIFEST_NAME, WriteOptions, partial_folder, write_output

__all__ = ["MANIFEST_NAME", "WriteOptions", "partial_folder", "write_output"]
