"""Deduplication as shuffles (pipeline/shuffle.py): exact and near copies are found by tasks over
partitions of files, never in the driver, and the decisions do not depend on the number of workers or
partitions. A module per phase, each with its public functions: scan.py (in prefilter's scan tasks),
exact.py, band.py, verify.py (join, verify), resolve.py (decide, prune, near), names.py (drops, names,
decisions); common.py holds what they share, phases.py runs them from the driver.

Nodes: a sample is node `shard index << 32 | rank of its key in the shard`, the order prefilter reads
them in; an eval image is `EVAL | eval shard << 32 | position`. Among the samples the rules kept:
  1. `eval_contaminated`: an exact copy, or a near copy within `decontaminate_max_distance`, of an eval
     image;
  2. `duplicate_exact`: the same original bytes as a smaller node not contaminated (the smallest node
     of each group of equal bytes is kept);
  3. `duplicate_near`: of the rest, in node order, a verified near copy (`near_max_distance`) of a
     smaller node that was kept. This is the greedy rule prefilter applied in one pass before; it keeps
     C of a chain A~B~C where A and C are distinct, which "keep the minimum of each connected component"
     would drop.
Phases (a task per unit; each writes its files under `<stage>/dedup/` atomically, then its marker, so a
resumed stage redoes only the units without one). A task that hashes rows into the P partitions of the
next phase writes one file with P row groups (row group p: partition p), not P files: P times fewer
files, fsyncs and, on an object store, PUTs; a partition's task reads its row group of each file.
  scan    per shard: rule verdicts and signatures (`scan/<unit>.parquet`, in node order), rows hashed
          into P partitions: the original bytes' sha256 (`exact/`), one row per LSH key with the whole
          SimHash and a digest of the signature (`band/`);
  exact   per partition: groups of equal hashes -> drops;
  band    per partition: the nodes sharing a key; pairs whose SimHashes differ in at most
          MAX_SIMHASH_BITS bits (bench/dedup.py: verified copies differ in at most 17 of 128) are
          candidates. Candidates with equal signature digests (the same pixels in other bytes) and
          pairs of blanks (decided from their aspect and colour) are edges at once; the rest go on,
          partitioned by their first node's unit. A bucket over BUCKET_CAP nodes is cut into runs of
          BUCKET_CAP in node order (counted: `buckets_cut`), so a bucket costs at most BUCKET_CAP^2/2
          pair tests per run, and each node keeps its first PAIRS_PER_NODE partners before it
          (`pairs_left_out`): a clique of copies gives O(m), not O(m^2), pairs;
  join    per partition: each pair gets its first node's signature from its unit's scan file,
          repartitioned by its second node's unit (signatures never go through the shuffle: only the
          pairs that need the verifier read them);
  verify  per partition: with the second node's signature, pipeline/data/neardup.py verifies -> edges;
          (exact drops and edges are written by the unit partition of their first node: a shard's
          nodes are decided together; phases.py runs them all from the driver)
  decide  per unit partition: eval_contaminated and duplicate_exact; edges from a dropped node left out,
          the rest sent to their second node's unit partition;
  prune   per unit partition: edges into a dropped node left out;
  near    one task: the greedy rule over the edges left (between nodes no other rule dropped), as arrays;
  drops   per unit partition: its shards' drops; the nodes they copy (their keepers) asked of the
          keepers' unit partitions;
  names   per unit partition: the keepers' keys (an eval image's benchmark and item) from their units'
          scan files, answered by the asking partition;
  decisions per unit partition: its shards' drops with their keepers' names, one file each.
Every drop says what it copies: `keeper`, the node kept (duplicate_exact: the first of its group of equal
bytes; duplicate_near: the kept node it copies, the closest if several; eval_contaminated: the eval image,
the closest), and `distance` (near_copy_distance; 0 for equal bytes or pixels).
"""
