"""Emulator builds are cached by content hash under $TINYSFT_CACHE or ~/.cache/tinysft/emu."""


def pytest_configure(config):
    config.addinivalue_line("markers", "sanitizer: runs an ASan/UBSan or TSan build of the emulator (small, default on)")
