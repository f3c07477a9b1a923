"""Layers > Segment menu entry: open the Segment widget on the selected image."""

from __future__ import annotations

from typing import Any


def segment_selected_layer(viewer: Any) -> None:
    """Dock the Segment widget (once) and point it at the selected Image layer."""
    from napari.layers import Image

    _, widget = viewer.window.add_plugin_dock_widget("napari-r2unet", "Segment")
    active = viewer.layers.selection.active
    if isinstance(active, Image):
        widget.image_combo.setCurrentText(active.name)
