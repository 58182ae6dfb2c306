"""The pure model of KVM and the TDX module (no cffi, no OS access)."""
