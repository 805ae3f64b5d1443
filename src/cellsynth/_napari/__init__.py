"""The napari layer: widgets, worker, sample data. The only package that imports napari or Qt."""
