from adapter_merge.cli.main import main

raise SystemExit(main())
