from busi.cli import main

raise SystemExit(main())
