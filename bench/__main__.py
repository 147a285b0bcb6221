from fastdin.bench.suite import main

raise SystemExit(main())
