"""Loaded by every Python the tests start while ARCHIVE_DROPBOX_WITHOUT_POSIX=1 (tests/conftest.py
puts this folder on PYTHONPATH): removes the POSIX-only parts of `os` that Windows lacks, so the
fallbacks Windows uses run on every change (issue 14). A module of its own name (usercustomize,
not sitecustomize) so that tests installing their own sitecustomize hooks keep them."""

import os

POSIX_ONLY = ("pread", "pwrite", "copy_file_range", "posix_fallocate", "O_DIRECT", "sched_getaffinity",
              "O_NOFOLLOW", "O_DIRECTORY")

for _name in POSIX_ONLY:
    if hasattr(os, _name):
        delattr(os, _name)
