"""The package's version, in a module of its own: what the store records in every manifest, imported without the
package root (whose lazy `BluePrint` export leads to every other module)."""

__version__ = "0.1.0"
