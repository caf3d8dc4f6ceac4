from collafuse_hpc.cli import main

raise SystemExit(main())
