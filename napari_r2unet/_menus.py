"""Layers > Segment menu entry: open the Segment widget on the selected image.

napari calls menu commands through app-model, which injects arguments by their type
annotation: the viewer parameter must be annotated :class:`napari.viewer.Viewer` (``Any`` gets
nothing injected). ``napari.viewer`` imports no torch and nothing napari has not loaded already.
"""

from __future__ import annotations

from napari.viewer import Viewer


def segment_selected_layer(viewer: Viewer) -> None:
    """Dock the Segment widget (once) and point it at the selected Image layer."""
    from napari.layers import Image

    _, widget = viewer.window.add_plugin_dock_widget("napari-r2unet", "Segment")
    active = viewer.layers.selection.active
    if isinstance(active, Image):
        widget.image_combo.setCurrentText(active.name)
