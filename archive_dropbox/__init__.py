"""archive_dropbox: move very large research data sets into Dropbox, safely and fast.

The numbered scripts (preProcess/1_listDirToZip.py, preProcess/2_zipDir.py, app.py,
joinFiles.py) are thin entry points; all the work happens in this package, one module per
concern. Nothing in the package prints directly: it logs, and the scripts' loggers mirror the
console.
"""

__version__ = "0.1.0"
