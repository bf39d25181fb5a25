"""Dataset layouts: one module each, registered in LAYOUTS under the name params' dataset.layout gives it.

A layout module has `FOLDER` (where fetch puts the dataset inside data/raw), `find_root(folder, dataset)` (the
dataset's root inside a source folder or unpacked archive) and `scan(root, dataset)` (every image as a
busi.data.images.Case, each problem one BusiError naming the file). A new layout is a module here and its entry
below; params' `dataset.layout` (or an external dataset's) names it (checked by busi.cli.check_tables).
"""

from busi.data.layouts import busi, folders

LAYOUTS = {"busi": busi, "folders": folders}
