"""The pure model: module profiles, hosts, kernel policies, feature names and the mirror.

Nothing in this package loads cffi or touches the operating system (a test
imports it in a fresh interpreter and checks); it reads only its own bundled
data files.
"""
