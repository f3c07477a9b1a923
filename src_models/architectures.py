"""The names of the four architectures, importable without torch (the CLI's parser uses them)."""

ARCHITECTURES: dict[str, str] = {
    "unet": "U-Net (Ronneberger et al. 2015): two conv3x3-norm-ReLU per level",
    "resunet": "ResU-Net: U-Net with residual units, y = conv1x1(x); y + f(f(y))",
    "runet": "RU-Net: two recurrent conv layers (t steps, shared weights) per level",
    "r2unet": "R2U-Net: recurrent residual units, y = conv1x1(x); y + R(R(y))",
}


def display_name(arch: str) -> str:
    """How menus name an architecture: its description up to the first ':' or ' (' ("R2U-Net", "U-Net")."""
    text = ARCHITECTURES.get(arch)
    if not text:
        return arch
    return text.split(":")[0].split(" (")[0].strip()
