"""Transparency-log building blocks: RFC 9162 Merkle trees and C2SP signed notes."""
