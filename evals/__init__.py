"""Everything that measures rather than serves: reports and benchmarks. It may import every other package;
none imports it."""
