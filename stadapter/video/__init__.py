"""Video input: PyAV decoding (decode), the paper's samplers (sampling), clip transforms (transforms),
annotation formats and the clip dataset (datasets), and the built-in synthetic motion set (synthetic)."""
